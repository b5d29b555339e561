import { randomUUID } from 'node:crypto'
import { lookup } from 'node:dns/promises'
import { link, mkdir, open, readFile, stat, unlink } from 'node:fs/promises'
import { isIP } from 'node:net'
import { join } from 'node:path'
import type { Identify } from '@libp2p/identify'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import type { KadDHT } from '@libp2p/kad-dht'
import type { Ping } from '@libp2p/ping'
import type { Multiaddr } from '@multiformats/multiaddr'
import type { Libp2p } from 'libp2p'
import { PeerBans } from './bans.ts'
import { PeerConfigError, PeerKeyError, SwarmKeyError } from './errors.ts'
import {
  createLibp2p, generateKey, generateKeyPair, identify, kadDHT, multiaddr, noise, passthroughMapper, ping, preSharedKey,
  privateKeyFromProtobuf, privateKeyToProtobuf, tcp, yamux
} from './libp2p.ts'

/** The DHT protocol id: private, so shoal nodes never join (or pollute) the public Amino DHT. */
export const DHT_PROTOCOL = '/shoal/kad/1.0.0'

/** createPeerNode's defaults. */
export const PEER_NODE_DEFAULTS = {
  /** Deadline per bootstrap dial (ms). */
  dialTimeoutMs: 5000,
  /** How often bootstrap is retried while the node has no connection at all (ms). */
  rebootstrapMs: 30_000,
  /** Lifetime of provider records (ms): see PeerNodeOptions.providerValidityMs. */
  providerValidityMs: 30 * 60_000
} as const

/** Loopback and private ranges: a cluster's own subnet connects without connection-rate limits. */
export const DEFAULT_ALLOW = ['127.0.0.0/8', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '::1/128', 'fc00::/7']

/** A type alias, not an interface: libp2p's ServiceMap needs an index-signature-compatible type. */
export type PeerServices = {
  identify: Identify
  ping: Ping
  dht: KadDHT
}

export interface PeerNodeOptions {
  /** Where the identity key lives (`peer.key`), so the peer id survives restarts. */
  stateDir: string
  /** Multiaddrs to listen on. Default `/ip4/127.0.0.1/tcp/0`. */
  listen?: string[]
  /**
   * Addresses to advertise instead of the listen addresses, e.g. the pod IP
   * when listening on 0.0.0.0 (otherwise peers are also told 127.0.0.1, which
   * is themselves).
   */
  announce?: string[]
  /**
   * Peers to dial at start, and again whenever we have no connection at all:
   * multiaddrs (`/ip4/10.0.0.5/tcp/4001/p2p/12D3…`, the /p2p part optional), or a
   * DNS name with a port (`shoal.ns.svc.cluster.local:4001`, `/dns4/name/tcp/4001`),
   * every address of which is dialled, as a Kubernetes headless service lists every pod.
   */
  bootstrap?: string[]
  /** Pre-shared swarm key (swarm.key v1 bytes): only nodes with the same key can connect. */
  psk?: Uint8Array
  /** CIDRs exempt from the connection manager's rate and count limits. Default DEFAULT_ALLOW. */
  allow?: string[]
  /** Resolves a bootstrap host name to all its addresses. Default: the system resolver, all records. */
  resolveHost?: (host: string) => Promise<string[]>
  /** Deadline per bootstrap dial. Default PEER_NODE_DEFAULTS. */
  dialTimeoutMs?: number
  /** How often to retry bootstrap while we have no connections. Default PEER_NODE_DEFAULTS. */
  rebootstrapMs?: number
  /**
   * Lifetime of provider records. We re-provide held packs at two thirds of it,
   * and records of nodes that died disappear within it. Default PEER_NODE_DEFAULTS (30 minutes).
   */
  providerValidityMs?: number
  /** Shared with the peer chunk source, which bans; the gater refuses banned peers. */
  bans?: PeerBans
  /** Aborting stops the node. */
  signal?: AbortSignal
}

export interface PeerNode {
  readonly libp2p: Libp2p<PeerServices>
  readonly peerId: PeerId
  readonly bans: PeerBans
  /** Our listen addresses, each ending in /p2p/<peerId>. */
  multiaddrs (): string[]
  connectedPeers (): PeerId[]
  /** Dials the bootstrap entries now; resolves to how many dials succeeded. */
  bootstrap (options: { signal: AbortSignal }): Promise<number>
  stop (): Promise<void>
}

/**
 * Starts a libp2p node for shoal: TCP, Noise, Yamux, identify, ping, and a
 * server-mode kad-dht under a private protocol, with an optional pre-shared-key
 * network. Resolves once listening and after one bootstrap round.
 */
export async function createPeerNode (options: PeerNodeOptions): Promise<PeerNode> {
  options.signal?.throwIfAborted()
  const privateKey = await loadOrCreatePeerKey(options.stateDir)
  const bans = options.bans ?? new PeerBans()
  const validity = options.providerValidityMs ?? PEER_NODE_DEFAULTS.providerValidityMs
  const dialTimeoutMs = options.dialTimeoutMs ?? PEER_NODE_DEFAULTS.dialTimeoutMs
  const resolveHost = options.resolveHost ?? resolveAllAddresses
  const bootstrapTargets = (options.bootstrap ?? []).map(parseBootstrap)
  const allow = (options.allow ?? DEFAULT_ALLOW).map(cidrToMultiaddr)
  const refused = (peer: PeerId): boolean => bans.isBanned(peer.toString())

  const libp2p = await createLibp2p<PeerServices>({
    privateKey,
    addresses: { listen: options.listen ?? ['/ip4/127.0.0.1/tcp/0'], announce: options.announce },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    ...(options.psk === undefined ? {} : { connectionProtector: preSharedKey({ psk: options.psk }) }),
    // Allow-listed hosts bypass the inbound rate limit (5/s per host) and pending-connection cap,
    // which otherwise reset connections in a burst with a misleading EncryptionFailedError (STACK.md #2).
    connectionManager: { allow },
    // Keep-alive pings judge a connection dead after 5 s by default; a node busy with a burst
    // (or a CPU-starved one) can take that long to answer, and each aborted connection then
    // costs a new Noise handshake and identify. The peer source has its own per-request
    // deadlines for slow peers, so the monitor only needs to catch dead hosts, slowly.
    connectionMonitor: { pingInterval: 30_000, pingTimeout: { minTimeout: 20_000 } },
    connectionGater: {
      denyDialPeer: refused,
      denyInboundEncryptedConnection: refused,
      denyOutboundEncryptedConnection: refused
    },
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({
        protocol: DHT_PROTOCOL,
        // Every node serves the DHT: cluster nodes are all dialable, no need to wait for AutoNAT to say so.
        clientMode: false,
        // The default mapper drops private addresses, which are the only ones a cluster has (STACK.md #4).
        peerInfoMapper: passthroughMapper,
        reprovide: { validity, threshold: Math.round(validity / 3), interval: Math.round(validity / 6) }
      })
    }
  })

  const dialAll = async (signal: AbortSignal): Promise<number> => {
    const own = new Set(libp2p.getMultiaddrs().map(a => a.decapsulateCode(P2P_CODE).toString()))
    const targets = (await Promise.all(bootstrapTargets.map(async t => await expandTarget(t, resolveHost).catch(() => []))))
      .flat()
      // A headless service lists this pod too; dialling ourselves only wastes a handshake.
      .filter(ma => !own.has(ma.decapsulateCode(P2P_CODE).toString()))
    const results = await Promise.allSettled(targets.map(async ma => await libp2p.dial(ma, { signal: AbortSignal.any([signal, AbortSignal.timeout(dialTimeoutMs)]) })))
    return results.filter(r => r.status === 'fulfilled').length
  }

  const stopping = new AbortController()
  const rebootstrap = setInterval(() => {
    if (libp2p.getConnections().length === 0) void dialAll(stopping.signal).catch(() => {})
  }, options.rebootstrapMs ?? PEER_NODE_DEFAULTS.rebootstrapMs).unref()

  let stopped: Promise<void> | undefined
  const node: PeerNode = {
    libp2p,
    peerId: libp2p.peerId,
    bans,
    multiaddrs: () => libp2p.getMultiaddrs().map(String),
    connectedPeers: () => libp2p.getPeers(),
    bootstrap: async ({ signal }) => await dialAll(signal),
    stop: async () => {
      stopped ??= (async () => {
        clearInterval(rebootstrap)
        stopping.abort(new Error('peer node stopped'))
        await libp2p.stop()
      })()
      await stopped
    }
  }
  options.signal?.addEventListener('abort', () => { void node.stop() }, { once: true })
  if (bootstrapTargets.length > 0) await dialAll(AbortSignal.any([stopping.signal, AbortSignal.timeout(dialTimeoutMs)]))
  return node
}

const P2P_CODE = 0x01a5
const DNS_NAMES = new Set(['dns', 'dns4', 'dns6'])

type BootstrapTarget = { kind: 'addr', addr: Multiaddr } | { kind: 'host', host: string, port: number }

function parseBootstrap (entry: string): BootstrapTarget {
  if (entry.startsWith('/')) {
    let addr: Multiaddr
    try {
      addr = multiaddr(entry)
    } catch (err) {
      throw new PeerConfigError(`bootstrap entry "${entry}" is not a valid multiaddr: ${(err as Error).message}`, { cause: err })
    }
    const [first, second] = addr.getComponents()
    const hasPeerId = addr.getComponents().some(c => c.code === P2P_CODE)
    // A DNS name with no peer id is a service name: dial every address, not whichever libp2p picks.
    if (first !== undefined && DNS_NAMES.has(first.name) && !hasPeerId && second?.name === 'tcp') {
      return { kind: 'host', host: first.value!, port: Number(second.value) }
    }
    return { kind: 'addr', addr }
  }
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(entry)
  const port = Number(match?.[3])
  if (match === null || port < 1 || port > 65535) {
    throw new PeerConfigError(`bootstrap entry "${entry}" is neither a multiaddr nor host:port (e.g. shoal.default.svc.cluster.local:4001)`)
  }
  return { kind: 'host', host: match[1] ?? match[2]!, port }
}

async function expandTarget (target: BootstrapTarget, resolveHost: (host: string) => Promise<string[]>): Promise<Multiaddr[]> {
  if (target.kind === 'addr') return [target.addr]
  const ips = isIP(target.host) !== 0 ? [target.host] : await resolveHost(target.host)
  return ips.map(ip => multiaddr(`/${isIP(ip) === 6 ? 'ip6' : 'ip4'}/${ip}/tcp/${target.port}`))
}

async function resolveAllAddresses (host: string): Promise<string[]> {
  return (await lookup(host, { all: true })).map(r => r.address)
}

function cidrToMultiaddr (cidr: string): string {
  const [ip, bits, extra] = cidr.split('/')
  const family = ip === undefined ? 0 : isIP(ip)
  const max = family === 6 ? 128 : 32
  const prefix = bits === undefined ? max : Number(bits)
  if (family === 0 || extra !== undefined || !Number.isInteger(prefix) || prefix < 0 || prefix > max) {
    throw new PeerConfigError(`allow entry "${cidr}" is not a CIDR (e.g. 10.0.0.0/8 or fc00::/7)`)
  }
  return `/${family === 6 ? 'ip6' : 'ip4'}/${ip}/ipcidr/${prefix}`
}

// --- identity key -----------------------------------------------------------

/**
 * The node's Ed25519 key, protobuf-marshalled in `stateDir/peer.key` (mode 0600).
 * Created on first start; a concurrent first start of another process on the
 * same directory is settled by link(2), which only one of them can win.
 */
export async function loadOrCreatePeerKey (stateDir: string): Promise<PrivateKey> {
  const file = join(stateDir, 'peer.key')
  await mkdir(stateDir, { recursive: true, mode: 0o700 })
  const existing = await readPeerKey(file)
  if (existing !== undefined) return existing
  await writeExclusive(file, privateKeyToProtobuf(await generateKeyPair('Ed25519')))
  const created = await readPeerKey(file)
  if (created === undefined) throw new PeerKeyError(file, 'vanished right after it was written')
  return created
}

async function readPeerKey (file: string): Promise<PrivateKey | undefined> {
  let bytes: Uint8Array
  try {
    const info = await stat(file)
    if ((info.mode & 0o077) !== 0) {
      throw new PeerKeyError(file, `is readable by other users (mode ${(info.mode & 0o777).toString(8)}); run chmod 600 on it`)
    }
    bytes = await readFile(file)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    if (err instanceof PeerKeyError) throw err
    throw new PeerKeyError(file, `cannot be read: ${(err as Error).message}`, { cause: err })
  }
  try {
    return privateKeyFromProtobuf(bytes)
  } catch (err) {
    throw new PeerKeyError(file, `is not a protobuf-encoded libp2p private key (${(err as Error).message}); move it away to get a new identity`, { cause: err })
  }
}

/** Writes `bytes` to `file` (mode 0600, synced) unless it exists; the loser of a race keeps the winner's file. */
async function writeExclusive (file: string, bytes: Uint8Array): Promise<void> {
  const tmp = `${file}.${randomUUID()}.tmp`
  const handle = await open(tmp, 'wx', 0o600)
  try {
    await handle.writeFile(bytes)
    await handle.sync()
  } finally {
    await handle.close()
  }
  try {
    await link(tmp, file)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
  } finally {
    await unlink(tmp)
  }
}

// --- pre-shared swarm key ---------------------------------------------------

const PSK_TAG = '/key/swarm/psk/1.0.0/'
const PSK_CODEC = '/base16/'

/** A fresh swarm key in the swarm.key v1 format that @libp2p/pnet (and go-libp2p, IPFS) read. */
export function generatePsk (): Uint8Array {
  const psk = new Uint8Array(PSK_TAG.length + PSK_CODEC.length + 2 + 64)
  generateKey(psk)
  return psk
}

/**
 * Checks a swarm key: three lines, `/key/swarm/psk/1.0.0/`, `/base16/`, and 64
 * hex digits. Returns it in canonical form (no trailing newline or CRs), which
 * is what preSharedKey wants.
 */
export function parsePsk (bytes: Uint8Array, file = 'swarm key'): Uint8Array {
  const [tag, codec, hex] = Buffer.from(bytes).toString('utf8').split(/\r?\n/)
  if (tag !== PSK_TAG) throw new SwarmKeyError(file, `first line must be ${PSK_TAG}`)
  if (codec !== PSK_CODEC) throw new SwarmKeyError(file, `second line must be ${PSK_CODEC} (the only encoding supported)`)
  if (hex === undefined || !/^[0-9a-fA-F]{64}$/.test(hex)) throw new SwarmKeyError(file, 'third line must be 64 hex digits (a 32-byte key)')
  return new TextEncoder().encode(`${PSK_TAG}\n${PSK_CODEC}\n${hex}`)
}

/** Reads the swarm key at `file`, or creates one there (mode 0600) for the first node of a new cluster. */
export async function loadOrCreatePsk (file: string): Promise<Uint8Array> {
  try {
    return parsePsk(await readFile(file), file)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  await writeExclusive(file, generatePsk())
  return parsePsk(await readFile(file), file)
}
