import { join, resolve } from 'node:path'
import type { Command } from 'commander'
import type { Agent, AgentStats, MountInfo } from '../../agent/agent.ts'
import type { AgentConfig } from '../../agent/config.ts'
import { DEFAULT_STATE_DIR } from '../../agent/constants.ts'
import { UsageError } from '../../errors.ts'
import type { RuntimeName } from '../../run/run-container.ts'
import { collect, parseSize } from '../args.ts'
import { mib, table } from '../output.ts'

// Only what the definitions need is imported here; each action imports what it runs
// (the agent, libp2p, pino, node:http), so `shoal --help` and `shoal stats` load none of
// the other commands' modules (docs/BENCHMARKS.md, "CLI start").

interface AgentFlags {
  config?: string
  state?: string
  origin: string[]
  registryCreds?: string
  registryCa?: string
  registryPlainHttp?: boolean
  redirectHost: string[]
  trust: string[]
  cacheSize?: string
  metrics?: string
  chunkTimeout?: string
  snapshotterSocket?: string
  listen: string[]
  peer: string[]
  psk?: string
  uploadRate?: string
  p2p?: boolean
  backgroundFetch?: boolean
  logLevel: string
}

export const AGENT_SHUTDOWN_DEFAULTS = {
  /**
   * How long `shoal agent` may take to stop after SIGINT/SIGTERM before it exits anyway.
   * A clean stop takes well under a second (lazy unmounts, closing the cache and the
   * sockets); 5 s leaves room for a busy node and stays far below Kubernetes' default
   * 30 s termination grace, so the kubelet never needs its SIGKILL. A second signal
   * exits at once.
   */
  graceMs: 5_000
} as const

/** The flags `shoal agent` and `shoal run` share. */
function agentOptions (cmd: Command): Command {
  return cmd
    .option('--config <file>', 'JSON config file (keys as in docs/USER-GUIDE.md); flags override it')
    .option('--state <dir>', `state directory: cache, catalogs, control socket (default ${DEFAULT_STATE_DIR})`)
    .option('--origin <url|dir>', 'origin: URL of `shoal origin serve`, a registry repository docker://HOST/REPO, or an OCI layout directory (repeatable: mirrors)', collect, [])
    .option('--registry-creds <user:password>', 'credentials for docker:// origins (default: the docker/podman login files)')
    .option('--registry-ca <file>', 'PEM CA certificate(s) to trust for docker:// origins, besides the system ones')
    .option('--registry-plain-http', 'reach docker:// origins over plain HTTP instead of HTTPS')
    .option('--redirect-host <host[:port]>', 'a host that http(s) origins may redirect to, e.g. their CDN (repeatable; default: redirects within the origin only)', collect, [])
    .option('--trust <pubkey>', 'trusted signing key, shoal.pub (repeatable)', collect, [])
    .option('--cache-size <size>', 'disk cache limit, e.g. 10G')
    .option('--metrics <host:port>', 'Prometheus metrics address, or "off" (default 127.0.0.1:0)')
    .option('--chunk-timeout <ms>', 'a read fails with EIO when a chunk cannot be had within this time')
    .option('--snapshotter-socket <path>', 'serve containerd\'s Snapshots API on this unix socket (proxy_plugins; see docs/USER-GUIDE.md)')
    .option('--listen <multiaddr>', 'peer-to-peer listen address (repeatable)', collect, [])
    .option('--peer <multiaddr>', 'bootstrap peer (repeatable)', collect, [])
    .option('--psk <file>', 'pre-shared key file: only peers with the same key can connect')
    .option('--upload-rate <bytes/s>', 'cap on uploads to peers, e.g. 50M (default: none)')
    .option('--no-p2p', 'use only the local cache and the origin')
    .option('--background-fetch', 'once a mount\'s start-up reads are served, stream the rest of its image into the cache (for containers that read most of their image)')
    .option('--log-level <level>', 'debug, info, warn or error', 'info')
}

async function buildConfig (flags: AgentFlags): Promise<AgentConfig> {
  const { defaultConfig, loadConfigFile, validateConfig } = await import('../../agent/config.ts')
  const fromFile = flags.config !== undefined ? await loadConfigFile(flags.config) : {}
  const defaults = defaultConfig()
  const base = { ...defaults, ...fromFile, p2p: { ...defaults.p2p, ...fromFile.p2p } }
  const config: AgentConfig = {
    ...base,
    stateDir: flags.state ?? base.stateDir,
    origins: flags.origin.length > 0 ? flags.origin : base.origins,
    registry: {
      ...base.registry,
      ...(flags.registryCreds !== undefined ? { credentials: flags.registryCreds } : {}),
      ...(flags.registryCa !== undefined ? { caFile: flags.registryCa } : {}),
      ...(flags.registryPlainHttp === true ? { plainHttp: true } : {})
    },
    redirectHosts: flags.redirectHost.length > 0 ? flags.redirectHost : base.redirectHosts,
    trust: flags.trust.length > 0 ? flags.trust : base.trust,
    cacheBytes: flags.cacheSize !== undefined ? parseSize(flags.cacheSize, '--cache-size') : base.cacheBytes,
    metrics: flags.metrics === 'off' ? '' : flags.metrics ?? base.metrics,
    chunkTimeoutMs: flags.chunkTimeout !== undefined ? Number(flags.chunkTimeout) : base.chunkTimeoutMs,
    snapshotterSocket: flags.snapshotterSocket ?? base.snapshotterSocket,
    backgroundFetch: flags.backgroundFetch === true || base.backgroundFetch,
    p2p: {
      ...base.p2p,
      enabled: flags.p2p !== false && base.p2p.enabled,
      listen: flags.listen.length > 0 ? flags.listen : base.p2p.listen,
      peers: flags.peer.length > 0 ? flags.peer : base.p2p.peers,
      ...(flags.psk !== undefined ? { pskFile: flags.psk } : {}),
      ...(flags.uploadRate !== undefined ? { uploadBytesPerSecond: parseSize(flags.uploadRate, '--upload-rate') } : {})
    }
  }
  return validateConfig(config)
}

const stateDirOf = (flags: { state?: string }): string => resolve(flags.state ?? DEFAULT_STATE_DIR)

export function registerAgentCommands (program: Command): void {
  agentOptions(program.command('agent'))
    .description('run the node agent: mounts images lazily, shares chunks with peers (until SIGINT/SIGTERM)')
    .action(async (flags: AgentFlags) => {
      const [{ Agent }, { controlSocketPath }, { default: pino }] = await Promise.all([import('../../agent/agent.ts'), import('../../agent/control.ts'), import('pino')])
      const config = await buildConfig(flags)
      const log = pino({ name: 'shoal-agent', level: flags.logLevel }, pino.destination(2))
      // The agent exits within the grace period of the first SIGINT/SIGTERM whatever its
      // mounts, peers or sockets do (also when the signal comes while it starts): an
      // unmount that fails or hangs must not keep a node's agent up until kill -9.
      // Mounts left behind are recorded in mounts.json, and the next start cleans them.
      // The handlers go in before the ready line: a signal sent as soon as it is read must find them.
      const giveUp = (why: string): void => {
        log.error({ graceMs: AGENT_SHUTDOWN_DEFAULTS.graceMs }, `${why}; exiting without finishing the stop (mounts left behind are cleaned up by the next start)`)
        process.exit(1)
      }
      let timer: NodeJS.Timeout | undefined
      const stopSignal = new Promise<NodeJS.Signals>(resolve => {
        const onSignal = (sig: NodeJS.Signals): void => {
          if (timer !== undefined) { giveUp(`${sig} again while stopping`); return }
          timer = setTimeout(() => giveUp(`the agent did not stop within ${AGENT_SHUTDOWN_DEFAULTS.graceMs} ms`), AGENT_SHUTDOWN_DEFAULTS.graceMs)
          resolve(sig)
        }
        for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, onSignal)
      })
      const agent = await Agent.start(config, { log })
      const stats = agent.stats()
      // One line that tells scripts (the demo, the simulator) the agent is ready and where to find it.
      console.log(JSON.stringify({ socket: controlSocketPath(config.stateDir), metrics: stats.metricsUrl, peerId: stats.peer?.peerId, multiaddrs: stats.peer?.multiaddrs, ...(config.snapshotterSocket !== '' ? { snapshotterSocket: config.snapshotterSocket } : {}) }))
      const signal = await stopSignal
      log.info({ signal }, 'stopping')
      await agent.stop()
      clearTimeout(timer)
      log.info('stopped')
      // Whatever handle a library may still hold (a FUSE session, a socket), the agent is done.
      process.exit(0)
    })

  program.command('mount')
    .description('mount an image (tag or sha256 digest at the origin) read-only, through the running agent')
    .argument('<image>').argument('<mountpoint>')
    .option('--state <dir>', 'the agent\'s state directory')
    .action(async (image: string, mountpoint: string, flags: { state?: string }) => {
      const { callAgent, controlSocketPath } = await import('../../agent/control.ts')
      const info = await callAgent<MountInfo>(controlSocketPath(stateDirOf(flags)), 'POST', '/v1/mounts', { image, mountpoint: resolve(mountpoint) })
      console.log(`mounted ${info.image} (${info.manifestDigest}) at ${info.mountpoint}`)
    })

  program.command('umount')
    .description('unmount an image mounted by the agent')
    .argument('<mountpoint>')
    .option('--state <dir>', 'the agent\'s state directory')
    .action(async (mountpoint: string, flags: { state?: string }) => {
      const { callAgent, controlSocketPath } = await import('../../agent/control.ts')
      await callAgent(controlSocketPath(stateDirOf(flags)), 'DELETE', '/v1/mounts', { mountpoint: resolve(mountpoint) })
    })

  program.command('ls')
    .description('list the images the agent has mounted')
    .option('--state <dir>', 'the agent\'s state directory')
    .option('--json', 'print as JSON')
    .action(async (flags: { state?: string, json?: boolean }) => {
      const { callAgent, controlSocketPath } = await import('../../agent/control.ts')
      const mounts = await callAgent<MountInfo[]>(controlSocketPath(stateDirOf(flags)), 'GET', '/v1/mounts')
      if (flags.json === true) { console.log(JSON.stringify(mounts, null, 2)); return }
      console.log(table([['mountpoint', 'image', 'digest', 'read', 'signature expires'], ...mounts.map(m => [m.mountpoint, m.image, m.manifestDigest.slice(0, 19), mib(m.fs.bytesRead), signatureExpiry(m)])]))
    })

  program.command('stats')
    .description('bytes by source (memory, disk, peers, origin), cache and mounts of the running agent')
    .option('--state <dir>', 'the agent\'s state directory')
    .option('--json', 'print as JSON')
    .action(async (flags: { state?: string, json?: boolean }) => {
      const { callAgent, controlSocketPath } = await import('../../agent/control.ts')
      const stats = await callAgent<AgentStats>(controlSocketPath(stateDirOf(flags)), 'GET', '/v1/stats')
      if (flags.json === true) console.log(JSON.stringify(stats, null, 2))
      else printStats(stats)
    })

  agentOptions(program.command('run'))
    .description('run a command in an image as a container (uses the running agent, or one in-process with the same flags)')
    .argument('<image>')
    .argument('[command...]', 'command and arguments (default: the image\'s entrypoint and cmd)')
    .option('--runtime <name>', 'runc, crun or chroot (default: the first one installed)')
    .option('-e, --env <NAME=VALUE>', 'extra environment variable (repeatable)', collect, [])
    .option('--summary', 'print bytes by source when the command ends (stderr)')
    .action(async (image: string, command: string[], flags: AgentFlags & { runtime?: RuntimeName, env: string[], summary?: boolean }) => {
      const controller = new AbortController()
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort())
      const [{ AgentNotRunningError, callAgent, controlSocketPath }, { runContainer }, { randomBytes }, { rm }] = await Promise.all([
        import('../../agent/control.ts'), import('../../run/run-container.ts'), import('node:crypto'), import('node:fs/promises')])
      const socket = controlSocketPath(stateDirOf(flags))
      const useDaemon = await callAgent(socket, 'GET', '/v1/stats').then(() => true, (err: unknown) => {
        if (err instanceof AgentNotRunningError) return false
        throw err
      })
      let agent: Agent | undefined
      if (flags.snapshotterSocket !== undefined) throw new UsageError('--snapshotter-socket belongs to shoal agent: containerd needs a snapshotter that outlives one command')
      if (!useDaemon) {
        if (flags.origin.length === 0 && flags.config === undefined) throw new UsageError(`no agent runs at ${socket}; start one (shoal agent), or give --origin and --trust to run one for this command`)
        const config = await buildConfig({ ...flags, metrics: flags.metrics ?? 'off' })
        const [{ Agent }, { default: pino }] = await Promise.all([import('../../agent/agent.ts'), import('pino')])
        agent = await Agent.start(config, { control: false, log: pino({ name: 'shoal-run', level: flags.logLevel === 'info' ? 'warn' : flags.logLevel }, pino.destination(2)) })
      }
      const mountpoint = join(stateDirOf(flags), 'run', randomBytes(6).toString('hex'))
      let code = 1
      try {
        const info = agent !== undefined ? await agent.mount(image, mountpoint, { signal: controller.signal, prefetchFirst: true }) : await callAgent<MountInfo>(socket, 'POST', '/v1/mounts', { image, mountpoint, prefetchFirst: true })
        try {
          code = await runContainer({ lowerDir: info.mountpoint, runtime: info.runtime, args: command, env: flags.env, signal: controller.signal, ...(flags.runtime !== undefined ? { use: flags.runtime } : {}) })
        } finally {
          if (agent !== undefined) await agent.umount(mountpoint)
          else await callAgent(socket, 'DELETE', '/v1/mounts', { mountpoint })
          await rm(mountpoint, { recursive: true, force: true }).catch(() => {})
        }
        if (flags.summary === true) {
          const stats = agent !== undefined ? agent.stats() : await callAgent<AgentStats>(socket, 'GET', '/v1/stats')
          process.stderr.write(summaryLine(stats) + '\n')
        }
      } finally {
        await agent?.stop()
      }
      process.exitCode = code
    })
}

function summaryLine (stats: AgentStats): string {
  const s = stats.sources
  const part = (name: string): string => `${name} ${mib(s[name]?.bytes ?? 0)}`
  return `bytes by source: ${['memory', 'disk', 'peers', 'origin'].filter(n => s[n] !== undefined).map(part).join(', ')}`
}

function printStats (s: AgentStats): void {
  if (s.peer !== undefined) console.log(`peer ${s.peer.peerId}, ${s.peer.connectedPeers} connected, listening on ${s.peer.multiaddrs.join(' ')}`)
  console.log(table([['source', 'chunks', 'bytes', 'verification failures'],
    ...Object.entries(s.sources).map(([name, v]) => [name, String(v.chunks), mib(v.bytes), String(s.verificationFailures[name] ?? '')])]))
  console.log(`cache: ${mib(s.cache.bytes)} of ${mib(s.cache.maxBytes)} in ${s.cache.chunks} chunks, ${s.cache.evictions} evictions; unavailable chunks: ${s.unavailable}`)
  if (s.snapshotter !== undefined) {
    const fallbacks = Object.entries(s.snapshotter.fallbacks).map(([reason, n]) => `${reason} ${n}`).join(', ')
    console.log(`snapshotter: ${s.snapshotter.mounted} lazy layers mounted, ${s.snapshotter.lazy} served lazily since start, ${mib(s.snapshotter.bytesRead)} read; left to containerd: ${fallbacks === '' ? 'none' : fallbacks}`)
  }
  for (const m of s.mounts) console.log(`mount ${m.mountpoint}: ${m.image} ${m.manifestDigest.slice(0, 19)}, ${mib(m.fs.bytesRead)} read, ${m.fs.readErrors} read errors, signature ${m.signature.expired ? `EXPIRED on ${m.signature.expires!} (still served; re-sign it: it will not mount again)` : `expires ${m.signature.expires ?? 'never'}`}`)
  if (s.metricsUrl !== undefined) console.log(`metrics: ${s.metricsUrl}`)
}

/** A mount's signature expiry for `shoal ls`: flagged once it has passed while mounted. */
function signatureExpiry (m: MountInfo): string {
  return m.signature.expired ? `EXPIRED ${m.signature.expires!} (re-sign)` : m.signature.expires ?? 'never'
}
