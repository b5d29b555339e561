/**
 * A real containerd (Debian's 1.6) with its CRI plugin, for tests and benchmarks:
 * its own config, root, state, sockets and log in a directory of the caller's,
 * optionally with a proxy snapshotter (shoal's) as the CRI snapshotter, and
 * plain-HTTP access to local test registries.
 *
 * containerd still writes one thing outside DIR: the runc shims' sockets in
 * /run/containerd/s/ (a hash of our gRPC address and the shim's id, so never a
 * name another containerd uses). runc's own state goes to DIR (the runc runtime's
 * Root option). The CRI plugin's namespace is k8s.io as always, but namespaces
 * live in this containerd's own metadata database; pod and container names only
 * need to be unique per containerd (runPod adds random suffixes anyway).
 *
 * No node:test imports here: benchmark scripts use this too.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, open, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises'
import { connect } from 'node:net'
import { join, resolve } from 'node:path'
import { runTool } from '../exec.ts'
import { CriClient, runPod, tailLines, type CriClientOptions, type RunPodOptions, type RunPodResult } from './cri-client.ts'

export const CONTAINERD = '/usr/bin/containerd'
export const CRI_NAMESPACE = 'k8s.io'
/** sun_path is 108 bytes with its NUL; the ttrpc socket adds ".ttrpc" to the gRPC one. */
const MAX_SOCKET_PATH = 107 - '.ttrpc'.length
const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
/** Where the runc v2 shim puts its sockets, whatever the config says (containerd 1.6). */
const SHIM_SOCKET_DIR = '/run/containerd/s'

/** Plugins a CRI test never uses: snapshotters that only log why they cannot load, tracing. */
const DISABLED_PLUGINS = [
  'io.containerd.snapshotter.v1.aufs',
  'io.containerd.snapshotter.v1.btrfs',
  'io.containerd.snapshotter.v1.devmapper',
  'io.containerd.snapshotter.v1.zfs',
  'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing'
]

export interface ContainerdOptions {
  /** Everything of this containerd goes here (created if missing; stop() deletes it). */
  dir: string
  /** The pause image for pod sandboxes, e.g. from pushSandboxImage(). */
  sandboxImage: string
  /** A proxy snapshotter (its gRPC socket) for the CRI plugin; default containerd's own overlayfs. */
  snapshotter?: { name: string, socket: string }
  /** Registries (host:port) reached over plain HTTP, e.g. the test registry's 127.0.0.1:PORT. */
  registryHosts?: string[]
  /** containerd's --log-level; default info. */
  logLevel?: 'trace' | 'debug' | 'info' | 'warn' | 'error'
  /** How long containerd may take until its CRI plugin answers; default 30 s. */
  startTimeoutMs?: number
  /** Options of the CRI client (deadlines). */
  client?: Omit<CriClientOptions, 'diagnostics'>
  /** stop() leaves dir (config, log, metadata) in place for a post-mortem; it still kills and unmounts. */
  keep?: boolean
}

export interface Containerd {
  /** containerd's gRPC socket (CRI and containerd API; use with `ctr -a`). */
  socket: string
  criClient: CriClient
  /** The CRI plugin's containerd namespace. */
  namespace: string
  dir: string
  configFile: string
  /** containerd's stdout and stderr. */
  logFile: string
  pid: number
  /** The last LINES lines of containerd's log, indented, for error messages. */
  logTail: (lines?: number) => Promise<string>
  /** runPod with this containerd's client. */
  runPod: (options: RunPodOptions) => Promise<RunPodResult>
  /**
   * Stops containerd (SIGTERM, SIGKILL after 5 s), kills what is left of its
   * containers and shims, unmounts everything below dir and deletes it.
   * Safe to call more than once, also after containerd died.
   */
  stop: () => Promise<void>
}

export interface ContainerdConfigInput {
  root: string
  state: string
  socket: string
  opt: string
  runcRoot: string
  cniConfDir: string
  cniBinDir: string
  registryConfigDir: string
  sandboxImage: string
  snapshotter?: { name: string, socket: string }
}

const q = (value: string): string => JSON.stringify(value)

/** containerd's config.toml (version 2) for a CRI test instance. */
export function containerdConfig (input: ContainerdConfigInput): string {
  const cri = 'plugins."io.containerd.grpc.v1.cri"'
  const lines = [
    'version = 2',
    `root = ${q(input.root)}`,
    `state = ${q(input.state)}`,
    `disabled_plugins = [${DISABLED_PLUGINS.map(q).join(', ')}]`,
    '',
    '[grpc]',
    `  address = ${q(input.socket)}`,
    '',
    '[ttrpc]',
    `  address = ${q(`${input.socket}.ttrpc`)}`,
    '',
    '[debug]',
    '  address = ""',
    '',
    '[metrics]',
    '  address = ""',
    '',
    '[plugins."io.containerd.internal.v1.opt"]',
    `  path = ${q(input.opt)}`,
    '',
    `[${cri}]`,
    `  sandbox_image = ${q(input.sandboxImage)}`,
    '  restrict_oom_score_adj = true',
    // The streaming server (exec/attach/port-forward) is not used; port 0 picks a free one.
    '  stream_server_address = "127.0.0.1"',
    '  stream_server_port = "0"',
    '  enable_selinux = false',
    '',
    `[${cri}.containerd]`,
    `  snapshotter = ${q(input.snapshotter?.name ?? 'overlayfs')}`,
    // Proxy snapshotters (stargz-like) learn the image ref and layer digests from these labels.
    `  disable_snapshot_annotations = ${input.snapshotter === undefined ? 'true' : 'false'}`,
    '  default_runtime_name = "runc"',
    '',
    `[${cri}.containerd.runtimes.runc]`,
    '  runtime_type = "io.containerd.runc.v2"',
    '',
    `[${cri}.containerd.runtimes.runc.options]`,
    // runc's state (default /run/containerd/runc/<namespace>) stays in our dir.
    `  Root = ${q(input.runcRoot)}`,
    '  SystemdCgroup = false',
    '',
    // Pods use the host network, so no CNI plugin runs; but the CRI plugin watches
    // (and would create) its conf dir, default /etc/cni/net.d: give it empty ones.
    `[${cri}.cni]`,
    `  bin_dir = ${q(input.cniBinDir)}`,
    `  conf_dir = ${q(input.cniConfDir)}`,
    '',
    `[${cri}.registry]`,
    `  config_path = ${q(input.registryConfigDir)}`
  ]
  if (input.snapshotter !== undefined) {
    lines.push('', `[proxy_plugins.${q(input.snapshotter.name)}]`, '  type = "snapshot"', `  address = ${q(input.snapshotter.socket)}`)
  }
  return lines.join('\n') + '\n'
}

/** hosts.toml for a plain-HTTP registry HOST (host:port), for the CRI registry's config_path. */
export function plainHttpHostsToml (host: string): string {
  return [
    `server = ${q(`http://${host}`)}`,
    '',
    `[host.${q(`http://${host}`)}]`,
    '  capabilities = ["pull", "resolve"]',
    ''
  ].join('\n')
}

export async function startContainerd (options: ContainerdOptions): Promise<Containerd> {
  const dir = resolve(options.dir)
  await mkdir(dir, { recursive: true })
  // unix socket paths must stay short; a deep DIR gets its sockets in a short temp dir.
  let socketDir = dir
  let ownSocketDir = false
  if (join(dir, 'containerd.sock').length > MAX_SOCKET_PATH) {
    socketDir = await mkdtemp('/tmp/shoal-ctd-')
    ownSocketDir = true
  }
  const socket = join(socketDir, 'containerd.sock')
  if (options.snapshotter !== undefined && options.snapshotter.socket.length > 107) {
    throw new Error(`the snapshotter socket path is ${options.snapshotter.socket.length} bytes, more than a unix socket path can hold (107): ${options.snapshotter.socket}`)
  }
  const paths = {
    root: join(dir, 'root'),
    state: join(dir, 'state'),
    opt: join(dir, 'opt'),
    runcRoot: join(dir, 'runc'),
    cniConfDir: join(dir, 'cni', 'net.d'),
    cniBinDir: join(dir, 'cni', 'bin'),
    registryConfigDir: join(dir, 'certs.d')
  }
  for (const path of Object.values(paths)) await mkdir(path, { recursive: true })
  for (const host of options.registryHosts ?? []) {
    // The directory is named like the registry host, port included: certs.d/127.0.0.1:5000/hosts.toml.
    await mkdir(join(paths.registryConfigDir, host), { recursive: true })
    await writeFile(join(paths.registryConfigDir, host, 'hosts.toml'), plainHttpHostsToml(host))
  }
  const configFile = join(dir, 'config.toml')
  await writeFile(configFile, containerdConfig({ ...paths, socket, sandboxImage: options.sandboxImage, snapshotter: options.snapshotter }))

  const logFile = join(dir, 'containerd.log')
  const log = await open(logFile, 'a')
  let child: ChildProcess
  try {
    child = spawn(CONTAINERD, ['--config', configFile, '--log-level', options.logLevel ?? 'info'], {
      stdio: ['ignore', log.fd, log.fd],
      env: { ...process.env, PATH }
    })
  } finally {
    await log.close()
  }
  // Should this process end without stop() (a crash), containerd must not outlive it.
  const killOnExit = (): void => { child.kill('SIGKILL') }
  process.once('exit', killOnExit)
  const exited = new Promise<void>(resolve => { child.once('exit', () => { process.removeListener('exit', killOnExit); resolve() }) })
  const spawnError = new Promise<Error>(resolve => { child.once('error', resolve) })
  const logTail = async (lines = 40): Promise<string> => {
    const text = await readFile(logFile, 'utf8').catch(() => '')
    return `containerd log (${logFile}), last ${lines} lines:\n${tailLines(text, lines)}`
  }
  const criClient = new CriClient(socket, { ...options.client, diagnostics: logTail })

  let stopped: Promise<void> | undefined
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      criClient.close()
      await stopContainerd(child, exited, socket, paths.state, paths.runcRoot)
      if (options.keep === true) {
        for (const mountPoint of await mountsBelow(dir)) await runTool('umount', ['-l', mountPoint], { timeoutMs: 10_000 }).catch(() => {})
      } else {
        await removeBelow(dir)
      }
      if (ownSocketDir) await removeBelow(socketDir)
    })()
    return stopped
  }

  try {
    await waitForCri(criClient, socket, child, options.startTimeoutMs ?? 30_000, spawnError)
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err)
    const tail = await logTail()
    await stop().catch(() => {})
    throw new Error(`containerd did not start: ${message}\n${tail}\n(config: ${configFile}${options.keep === true ? '' : ', deleted now'})`, { cause: err })
  }
  return {
    socket,
    criClient,
    namespace: CRI_NAMESPACE,
    dir,
    configFile,
    logFile,
    pid: child.pid!,
    logTail,
    runPod: async runOptions => await runPod(criClient, runOptions),
    stop
  }
}

/** Waits until the socket accepts connections, then until the CRI plugin answers Version (it refuses calls until initialized). */
async function waitForCri (client: CriClient, socket: string, child: ChildProcess, timeoutMs: number, spawnError: Promise<Error>): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let failed: Error | undefined
  void spawnError.then(err => { failed = err })
  const check = (): void => {
    if (failed !== undefined) throw new Error(`cannot run ${CONTAINERD}: ${failed.message}`)
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`containerd exited (${child.exitCode ?? child.signalCode})`)
  }
  // Connect first: grpc-js backs off for seconds after failed connects.
  for (;;) {
    check()
    const ok = await new Promise<boolean>(resolve => {
      const s = connect(socket)
      s.once('connect', () => { s.destroy(); resolve(true) })
      s.once('error', () => { resolve(false) })
    })
    if (ok) break
    if (Date.now() > deadline) throw new Error(`its socket ${socket} did not accept connections within ${timeoutMs} ms`)
    await sleep(50)
  }
  let last: unknown
  for (;;) {
    check()
    try {
      await client.version({ timeoutMs: 2000 })
      return
    } catch (err) { last = err }
    if (Date.now() > deadline) throw new Error(`its CRI plugin did not answer Version within ${timeoutMs} ms: ${last instanceof Error ? last.message : String(last)}`)
    await sleep(100)
  }
}

async function stopContainerd (child: ChildProcess, exited: Promise<void>, socket: string, state: string, runcRoot: string): Promise<void> {
  // (No pid: it never ran, and there is no exit to wait for.)
  if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
    child.kill('SIGTERM')
    const timer = setTimeout(() => { child.kill('SIGKILL') }, 5000)
    await exited
    clearTimeout(timer)
  }
  // Containers and shims outlive containerd by design. runc delete --force kills a
  // container's processes and removes its cgroup and state; then the shims, which
  // would exit by themselves once their tasks are deleted, are killed.
  const taskIds = await taskBundles(state)
  for (const id of await readdir(join(runcRoot, CRI_NAMESPACE)).catch(() => [] as string[])) {
    await runTool('runc', ['--root', join(runcRoot, CRI_NAMESPACE), 'delete', '--force', id], { timeoutMs: 30_000 }).catch(() => {})
  }
  const shims = await shimsOf(socket)
  for (const pid of shims) {
    try { process.kill(pid, 'SIGKILL') } catch {}
  }
  for (const pid of shims) await waitGone(pid, 5000)
  // A killed shim leaves its socket behind: /run/containerd/s/sha256(address/ns/id).
  for (const id of taskIds) {
    const hash = createHash('sha256').update(join(socket, CRI_NAMESPACE, id)).digest('hex')
    await rm(join(SHIM_SOCKET_DIR, hash), { force: true })
  }
}

/** Task ids: the bundle directories in the state dir (each task's, whether or not its shim lives). */
async function taskBundles (state: string): Promise<string[]> {
  return await readdir(join(state, 'io.containerd.runtime.v2.task', CRI_NAMESPACE)).catch(() => [] as string[])
}

/** pids of containerd-shim-runc-v2 processes started by the containerd at SOCKET (their -address argument). */
export async function shimsOf (socket: string): Promise<number[]> {
  const pids: number[] = []
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue
    const args = (await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')).split('\0')
    if (!args[0]?.endsWith('containerd-shim-runc-v2')) continue
    const at = args.indexOf('-address')
    if (at !== -1 && args[at + 1] === socket) pids.push(Number(name))
  }
  return pids
}

async function waitGone (pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    // A zombie is gone enough (its parent, init, reaps it).
    const status = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
    if (status === undefined || / Z /.test(status)) return
    await sleep(20)
  }
}

/** Mount points at or below DIR (from our mountinfo, octal escapes decoded), deepest first. */
export async function mountsBelow (dir: string): Promise<string[]> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  return mountinfo.split('\n')
    .map(line => line.split(' ')[4])
    .filter((field): field is string => field !== undefined)
    .map(field => field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))))
    .filter(mountPoint => mountPoint === dir || mountPoint.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length)
}

/** Lazily unmounts everything below DIR, then deletes it; refuses if something stays mounted. */
async function removeBelow (dir: string): Promise<void> {
  try { await stat(dir) } catch { return }
  for (const mountPoint of await mountsBelow(dir)) {
    await runTool('umount', ['-l', mountPoint], { timeoutMs: 10_000 }).catch(() => {})
  }
  const left = await mountsBelow(dir)
  if (left.length > 0) throw new Error(`not deleting ${dir}: still mounted below it: ${left.join(', ')}`)
  await rm(dir, { recursive: true, force: true })
}

/** Processes whose executable is a containerd-shim-runc-v2 (any containerd's): for leak checks. */
export async function allShimPids (): Promise<number[]> {
  const pids: number[] = []
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue
    const exe = await readlink(`/proc/${name}/exe`).catch(() => '')
    if (exe.endsWith('/containerd-shim-runc-v2')) pids.push(Number(name))
  }
  return pids
}

function sleep (ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms))
}
