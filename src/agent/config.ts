import { readFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { UsageError } from '../errors.ts'
import { peerBudgetMs } from '../p2p/peer-source-defaults.ts'
import { DEFAULT_STATE_DIR } from './constants.ts'
import type { RegistryAccess } from '../registry/client.ts'

/** Everything an agent needs; from a JSON file, overridden by flags. */
export interface AgentConfig {
  /** Holds the control socket, catalogs, the chunk cache, the peer key. One per agent. */
  stateDir: string
  /** Where images come from: http(s):// URLs of a served OCI layout, registry repositories docker://HOST/REPO, or layout directories. */
  origins: string[]
  /** For docker:// origins: credentials USER:PASSWORD (else the docker/podman auth files), caFile, plainHttp. */
  registry: RegistryAccess
  /**
   * For http(s):// origins: hosts (`host` or `host:port`) their redirects may lead to,
   * e.g. the CDN or object store an origin hands blobs off to. Redirects within the
   * origin's own scheme, host and port are always followed, any other is refused.
   */
  redirectHosts: string[]
  /** Public keys (shoal.pub files) whose signatures are accepted. */
  trust: string[]
  /** Disk cache limit in bytes. */
  cacheBytes: number
  /** Memory cache limit in bytes. */
  memoryBytes: number
  /** Prometheus metrics address, `127.0.0.1:PORT` (0 = any free port), or '' for none. */
  metrics: string
  /** Upper bound on resolving one chunk (all sources and retries): a read fails with EIO after it. */
  chunkTimeoutMs: number
  /** Serve containerd's Snapshots API (a proxy snapshotter) on this unix socket; '' = off. */
  snapshotterSocket: string
  /** Stream the rest of each mounted image into the cache once its start-up reads are served (src/agent/background-fetch.ts). */
  backgroundFetch: boolean
  /** Peer-to-peer settings; `enabled: false` makes the agent use only its cache and the origin. */
  p2p: {
    enabled: boolean
    listen: string[]
    peers: string[]
    pskFile?: string
    /** Cap on what this node uploads to peers, bytes/s (beyond it peers are told `busy`); absent = no cap. */
    uploadBytesPerSecond?: number
  }
}

export function defaultConfig (stateDir = DEFAULT_STATE_DIR): AgentConfig {
  return {
    stateDir,
    origins: [],
    registry: {},
    redirectHosts: [],
    trust: [],
    cacheBytes: 10 * 2 ** 30,
    memoryBytes: 64 * 2 ** 20,
    metrics: '127.0.0.1:0',
    chunkTimeoutMs: 20_000,
    snapshotterSocket: '',
    backgroundFetch: false,
    p2p: { enabled: true, listen: ['/ip4/127.0.0.1/tcp/0'], peers: [] }
  }
}

/** Reads a JSON config file (same keys as AgentConfig) over the defaults. */
export async function loadConfigFile (path: string): Promise<Partial<AgentConfig>> {
  let text: string
  try { text = await readFile(path, 'utf8') } catch { throw new UsageError(`cannot read config file ${path}`) }
  let value: unknown
  try { value = JSON.parse(text) } catch (err) { throw new UsageError(`config file ${path} is not valid JSON: ${(err as Error).message}`) }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new UsageError(`config file ${path} must hold a JSON object`)
  const known = new Set(Object.keys(defaultConfig()))
  for (const key of Object.keys(value)) {
    if (!known.has(key)) throw new UsageError(`config file ${path}: unknown key "${key}" (known: ${[...known].join(', ')})`)
  }
  return value as Partial<AgentConfig>
}

/** Checks a finished config and makes paths absolute. */
export function validateConfig (config: AgentConfig): AgentConfig {
  // A snapshotter finds each image in the registry its pod names, so it needs no origin of its own.
  if (config.origins.length === 0 && config.snapshotterSocket === '') throw new UsageError('no origin configured: pass --origin URL (a `shoal origin serve` address) or --origin DIR (an OCI layout), or --snapshotter-socket SOCK to serve containerd')
  if (config.trust.length === 0) throw new UsageError('no trusted key configured: pass --trust shoal.pub (unsigned images are always refused)')
  if (!Number.isSafeInteger(config.cacheBytes) || config.cacheBytes < 16 * 2 ** 20) throw new UsageError(`cache size ${config.cacheBytes} is too small (at least 16 MiB)`)
  if (!Number.isSafeInteger(config.memoryBytes) || config.memoryBytes < 2 ** 20) throw new UsageError(`memory cache size ${config.memoryBytes} is too small (at least 1 MiB)`)
  const upload = config.p2p.uploadBytesPerSecond
  if (upload !== undefined && !(upload > 0)) throw new UsageError(`upload rate ${upload} must be a positive number of bytes per second (leave it out for no cap)`)
  if (!Array.isArray(config.redirectHosts)) throw new UsageError('redirectHosts must be a list of hosts, e.g. "redirectHosts": ["cdn.example.com"] in the config file')
  for (const host of config.redirectHosts) {
    // HttpOrigin checks them too; here the message can name the flag.
    if (typeof host !== 'string' || !/^[^/?#@\s:]+(:\d{1,5})?$|^\[[0-9a-fA-F:.]+\](:\d{1,5})?$/.test(host)) throw new UsageError(`redirect host "${host}" is not a host: write HOST or HOST:PORT (no scheme, no path), e.g. --redirect-host cdn.example.com or --redirect-host 10.0.0.5:9000`)
  }
  if (!(config.chunkTimeoutMs > 0)) throw new UsageError(`chunk timeout ${config.chunkTimeoutMs} must be positive`)
  // Peers must give up in time for the origin to be asked within the chunk timeout.
  if (config.p2p.enabled) peerBudgetMs(config.chunkTimeoutMs)
  return {
    ...config,
    stateDir: resolve(config.stateDir),
    snapshotterSocket: config.snapshotterSocket === '' ? '' : resolve(config.snapshotterSocket),
    trust: config.trust.map(p => resolve(p)),
    origins: config.origins.map(o => /^(https?|docker):\/\//.test(o) ? o.replace(/\/+$/, '') : resolve(o)),
    registry: { ...config.registry, ...(config.registry.caFile !== undefined ? { caFile: resolve(config.registry.caFile) } : {}) }
  }
}
