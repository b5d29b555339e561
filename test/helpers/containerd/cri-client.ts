/**
 * A small client of the Kubernetes CRI API (runtime.v1, the subset in cri.proto)
 * over a unix socket, and `runPod`, which runs one container the way a kubelet
 * does: pull, sandbox, create, start, wait for the exit, read the log, clean up.
 *
 * Every call carries a deadline: a wedged runtime makes a test fail, not hang.
 * Messages use proto-loader's camelCase field names; int64 fields arrive as
 * decimal strings (nanosecond timestamps do not fit in a double).
 * No node:test imports here: benchmark scripts use this too.
 */
import * as grpc from '@grpc/grpc-js'
import * as protoLoader from '@grpc/proto-loader'
import { randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const PROTO = fileURLToPath(new URL('./cri.proto', import.meta.url))

// ---------------------------------------------------------------------------------
// Messages (only the fields cri.proto keeps)

export type NamespaceMode = 'POD' | 'CONTAINER' | 'NODE' | 'TARGET'
export type ContainerState = 'CONTAINER_CREATED' | 'CONTAINER_RUNNING' | 'CONTAINER_EXITED' | 'CONTAINER_UNKNOWN'

export interface NamespaceOption { network?: NamespaceMode, pid?: NamespaceMode, ipc?: NamespaceMode, targetId?: string }
export interface Int64Value { value: string | number }

export interface PodSandboxConfig {
  metadata: { name: string, uid: string, namespace: string, attempt?: number }
  hostname?: string
  logDirectory?: string
  dnsConfig?: { servers?: string[], searches?: string[], options?: string[] }
  labels?: Record<string, string>
  annotations?: Record<string, string>
  linux?: {
    cgroupParent?: string
    securityContext?: { namespaceOptions?: NamespaceOption, runAsUser?: Int64Value, readonlyRootfs?: boolean, privileged?: boolean }
    sysctls?: Record<string, string>
  }
}

export interface ImageSpec { image: string, annotations?: Record<string, string>, userSpecifiedImage?: string, runtimeHandler?: string }

export interface ContainerConfig {
  metadata: { name: string, attempt?: number }
  image: ImageSpec
  command?: string[]
  args?: string[]
  workingDir?: string
  envs?: Array<{ key: string, value: string }>
  mounts?: Array<{ containerPath: string, hostPath: string, readonly?: boolean }>
  labels?: Record<string, string>
  annotations?: Record<string, string>
  logPath?: string
  stdin?: boolean
  stdinOnce?: boolean
  tty?: boolean
  linux?: {
    securityContext?: {
      privileged?: boolean
      namespaceOptions?: NamespaceOption
      runAsUser?: Int64Value
      runAsUsername?: string
      readonlyRootfs?: boolean
      noNewPrivs?: boolean
    }
  }
}

export interface VersionResponse { version: string, runtimeName: string, runtimeVersion: string, runtimeApiVersion: string }

export interface ContainerStatus {
  id: string
  metadata: { name: string, attempt: number } | null
  state: ContainerState
  /** Nanoseconds since the epoch, as a decimal string ('0' when not yet). */
  createdAt: string
  startedAt: string
  finishedAt: string
  exitCode: number
  image: ImageSpec | null
  imageRef: string
  reason: string
  message: string
  logPath: string
}

export interface Image {
  id: string
  repoTags: string[]
  repoDigests: string[]
  /** Bytes, as a decimal string. */
  size: string
  uid: Int64Value | null
  username: string
  spec: ImageSpec | null
  pinned: boolean
}

export interface AuthConfig { username?: string, password?: string, auth?: string, serverAddress?: string, identityToken?: string, registryToken?: string }

// ---------------------------------------------------------------------------------
// The client

export interface CallOptions {
  /** Deadline of this call; default: the client's defaultTimeoutMs (PullImage: pullTimeoutMs). */
  timeoutMs?: number
  signal?: AbortSignal
}

export interface CriClientOptions {
  /** Default deadline of a call; default 60 s. */
  defaultTimeoutMs?: number
  /** Default deadline of PullImage; default 10 min. */
  pullTimeoutMs?: number
  /**
   * What to append to the message of a failed runPod (e.g. the tail of the
   * runtime's log). Errors thrown by it are ignored.
   */
  diagnostics?: () => Promise<string>
}

type Unary = (request: object, metadata: grpc.Metadata, options: grpc.CallOptions, callback: (err: grpc.ServiceError | null, response?: unknown) => void) => grpc.ClientUnaryCall

let packageDefinition: protoLoader.PackageDefinition | undefined

function loadServices (): { runtime: grpc.ServiceClientConstructor, image: grpc.ServiceClientConstructor } {
  packageDefinition ??= protoLoader.loadSync(PROTO, { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true })
  const loaded = grpc.loadPackageDefinition(packageDefinition) as unknown as { runtime: { v1: { RuntimeService: grpc.ServiceClientConstructor, ImageService: grpc.ServiceClientConstructor } } }
  return { runtime: loaded.runtime.v1.RuntimeService, image: loaded.runtime.v1.ImageService }
}

export class CriClient {
  readonly socket: string
  readonly defaultTimeoutMs: number
  readonly pullTimeoutMs: number
  readonly diagnostics: (() => Promise<string>) | undefined
  readonly #runtime: grpc.Client
  readonly #image: grpc.Client

  /** SOCKET: the path of the runtime's unix socket (containerd's gRPC address). */
  constructor (socket: string, options: CriClientOptions = {}) {
    this.socket = socket
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? 60_000
    this.pullTimeoutMs = options.pullTimeoutMs ?? 10 * 60_000
    this.diagnostics = options.diagnostics
    const services = loadServices()
    const address = `unix://${socket}`
    // One channel for both services; grpc-js's default 4 MiB receive limit is plenty here.
    this.#runtime = new services.runtime(address, grpc.credentials.createInsecure())
    this.#image = new services.image(address, grpc.credentials.createInsecure(), { channelOverride: this.#runtime.getChannel() })
  }

  close (): void {
    this.#runtime.close()
  }

  async #call<T> (client: grpc.Client, method: string, request: object, options: CallOptions = {}, defaultTimeoutMs = this.defaultTimeoutMs): Promise<T> {
    const timeoutMs = options.timeoutMs ?? defaultTimeoutMs
    const fn = (client as unknown as Record<string, Unary>)[method]!.bind(client)
    const signal = options.signal
    signal?.throwIfAborted()
    return await new Promise<T>((resolve, reject) => {
      const onAbort = (): void => { call.cancel() }
      const call = fn(request, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, response) => {
        signal?.removeEventListener('abort', onAbort)
        if (err === null) { resolve(response as T); return }
        if (signal?.aborted === true) { reject(signal.reason); return }
        const why = err.code === grpc.status.DEADLINE_EXCEEDED ? `no answer within ${timeoutMs} ms` : `${grpc.status[err.code] ?? err.code}: ${err.details}`
        reject(Object.assign(new Error(`CRI ${method} on ${this.socket} failed: ${why}`, { cause: err }), { code: err.code }))
      })
      signal?.addEventListener('abort', onAbort, { once: true })
    })
  }

  // RuntimeService

  async version (options?: CallOptions): Promise<VersionResponse> {
    return await this.#call(this.#runtime, 'Version', { version: 'v1' }, options)
  }

  async runPodSandbox (config: PodSandboxConfig, options?: CallOptions & { runtimeHandler?: string }): Promise<string> {
    const response = await this.#call<{ podSandboxId: string }>(this.#runtime, 'RunPodSandbox', { config, runtimeHandler: options?.runtimeHandler ?? '' }, options)
    return response.podSandboxId
  }

  async stopPodSandbox (podSandboxId: string, options?: CallOptions): Promise<void> {
    await this.#call(this.#runtime, 'StopPodSandbox', { podSandboxId }, options)
  }

  async removePodSandbox (podSandboxId: string, options?: CallOptions): Promise<void> {
    await this.#call(this.#runtime, 'RemovePodSandbox', { podSandboxId }, options)
  }

  async createContainer (podSandboxId: string, config: ContainerConfig, sandboxConfig: PodSandboxConfig, options?: CallOptions): Promise<string> {
    const response = await this.#call<{ containerId: string }>(this.#runtime, 'CreateContainer', { podSandboxId, config, sandboxConfig }, options)
    return response.containerId
  }

  async startContainer (containerId: string, options?: CallOptions): Promise<void> {
    await this.#call(this.#runtime, 'StartContainer', { containerId }, options)
  }

  /** TIMEOUTSECONDS: grace period before SIGKILL (0: kill at once). */
  async stopContainer (containerId: string, timeoutSeconds = 0, options?: CallOptions): Promise<void> {
    await this.#call(this.#runtime, 'StopContainer', { containerId, timeout: timeoutSeconds }, options)
  }

  async removeContainer (containerId: string, options?: CallOptions): Promise<void> {
    await this.#call(this.#runtime, 'RemoveContainer', { containerId }, options)
  }

  async containerStatus (containerId: string, options?: CallOptions): Promise<ContainerStatus> {
    const response = await this.#call<{ status: ContainerStatus }>(this.#runtime, 'ContainerStatus', { containerId, verbose: false }, options)
    return response.status
  }

  // ImageService

  /** Pulls IMAGE (a reference such as 127.0.0.1:5000/python:3); returns the image ref (id) the runtime gives it. */
  async pullImage (image: string, options?: CallOptions & { sandboxConfig?: PodSandboxConfig, auth?: AuthConfig }): Promise<string> {
    const request = { image: { image }, auth: options?.auth ?? null, sandboxConfig: options?.sandboxConfig ?? null }
    const response = await this.#call<{ imageRef: string }>(this.#image, 'PullImage', request, options, this.pullTimeoutMs)
    return response.imageRef
  }

  /** The image, or undefined if the runtime does not have it. */
  async imageStatus (image: string, options?: CallOptions): Promise<Image | undefined> {
    const response = await this.#call<{ image: Image | null }>(this.#image, 'ImageStatus', { image: { image }, verbose: false }, options)
    return response.image ?? undefined
  }

  async listImages (options?: CallOptions): Promise<Image[]> {
    const response = await this.#call<{ images: Image[] }>(this.#image, 'ListImages', {}, options)
    return response.images
  }

  async removeImage (image: string, options?: CallOptions): Promise<void> {
    await this.#call(this.#image, 'RemoveImage', { image: { image } }, options)
  }
}

// ---------------------------------------------------------------------------------
// runPod

export interface RunPodOptions {
  /** Image reference, e.g. 127.0.0.1:5000/python:3. */
  image: string
  /** The container's command (overrides the image's entrypoint) and args (its cmd). */
  command?: string[]
  args?: string[]
  env?: Record<string, string>
  workingDir?: string
  /** Pod and container name prefix; a random suffix makes each run unique. Default "shoal". */
  name?: string
  /** Where the container log goes; default: a new temp dir, removed afterwards. */
  logDirectory?: string
  /** Skip PullImage (the image must be there already, or CreateContainer fails). */
  skipPull?: boolean
  /** Deadline of PullImage; default the client's pullTimeoutMs. */
  pullTimeoutMs?: number
  /** How long the container may run before runPod gives up and kills it; default 2 min. */
  exitTimeoutMs?: number
  /** ContainerStatus polling interval; default 50 ms. */
  pollMs?: number
  /** Also return the raw CRI log lines. */
  rawLog?: boolean
  signal?: AbortSignal
}

export interface RunPodResult {
  exitCode: number
  /** The container's stdout and stderr, reassembled from the CRI log. */
  stdout: string
  stderr: string
  /** ContainerStatus reason/message at exit (e.g. "Completed", "Error", "OOMKilled"). */
  reason: string
  message: string
  imageRef: string
  podSandboxId: string
  containerId: string
  timings: {
    /** PullImage round trip (0 with skipPull). */
    pullMs: number
    /** RunPodSandbox round trip. */
    sandboxMs: number
    /** CreateContainer round trip. */
    createMs: number
    /** From sending StartContainer until runPod saw the container EXITED. */
    startToExitMs: number
    /** The container's own run time by the runtime's clock (finished_at - started_at). */
    runMs: number
    /** Everything, cleanup included. */
    totalMs: number
  }
  rawLog?: string
}

/**
 * Runs one container in a new pod with the host's network, as a kubelet would:
 * PullImage (with the sandbox config), RunPodSandbox, CreateContainer, StartContainer,
 * ContainerStatus until EXITED, then the log is read and the container and the
 * sandbox are stopped and removed (also when something failed on the way).
 * A non-zero exit code is a result, not an error; failing calls, a container that
 * does not exit in time and failed cleanup throw.
 */
export async function runPod (client: CriClient, options: RunPodOptions): Promise<RunPodResult> {
  const started = performance.now()
  const suffix = randomBytes(4).toString('hex')
  const name = `${options.name ?? 'shoal'}-${suffix}`
  const ownLogDir = options.logDirectory === undefined
  const logDirectory = options.logDirectory ?? await mkdtemp(join(tmpdir(), 'shoal-pod-logs-'))
  await mkdir(logDirectory, { recursive: true })
  const signal = options.signal
  const hostNetwork: NamespaceOption = { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' }
  const sandboxConfig: PodSandboxConfig = {
    metadata: { name, uid: randomBytes(16).toString('hex'), namespace: 'shoal-test', attempt: 0 },
    hostname: '',
    logDirectory,
    labels: { 'io.kubernetes.pod.name': name, 'io.kubernetes.pod.namespace': 'shoal-test' },
    linux: { securityContext: { namespaceOptions: hostNetwork } }
  }
  const logPath = `${name}/0.log`
  const containerConfig: ContainerConfig = {
    metadata: { name, attempt: 0 },
    image: { image: options.image },
    command: options.command ?? [],
    args: options.args ?? [],
    workingDir: options.workingDir ?? '',
    envs: Object.entries(options.env ?? {}).map(([key, value]) => ({ key, value })),
    logPath,
    linux: { securityContext: { namespaceOptions: hostNetwork } }
  }

  let podSandboxId: string | undefined
  let containerId: string | undefined
  let step = 'PullImage'
  const timings = { pullMs: 0, sandboxMs: 0, createMs: 0, startToExitMs: 0, runMs: 0, totalMs: 0 }
  let result: Omit<RunPodResult, 'timings' | 'podSandboxId' | 'containerId'> | undefined
  let failure: unknown
  try {
    let imageRef = ''
    if (options.skipPull !== true) {
      const t = performance.now()
      imageRef = await client.pullImage(options.image, { sandboxConfig, timeoutMs: options.pullTimeoutMs, signal })
      timings.pullMs = performance.now() - t
    }
    step = 'RunPodSandbox'
    let t = performance.now()
    podSandboxId = await client.runPodSandbox(sandboxConfig, { signal })
    timings.sandboxMs = performance.now() - t
    step = 'CreateContainer'
    t = performance.now()
    containerId = await client.createContainer(podSandboxId, containerConfig, sandboxConfig, { signal })
    timings.createMs = performance.now() - t
    step = 'StartContainer'
    t = performance.now()
    await client.startContainer(containerId, { signal })
    step = 'waiting for the container to exit'
    const status = await waitForExit(client, containerId, options.exitTimeoutMs ?? 120_000, options.pollMs ?? 50, signal, join(logDirectory, logPath))
    timings.startToExitMs = performance.now() - t
    timings.runMs = Number((BigInt(status.finishedAt) - BigInt(status.startedAt)) / 1_000_000n)
    step = 'reading the container log'
    const raw = await readFile(join(logDirectory, logPath), 'utf8')
    const { stdout, stderr } = parseCriLog(raw)
    result = {
      exitCode: status.exitCode,
      stdout,
      stderr,
      reason: status.reason,
      message: status.message,
      imageRef: imageRef !== '' ? imageRef : status.imageRef,
      ...(options.rawLog === true ? { rawLog: raw } : {})
    }
  } catch (err) {
    failure = err
  }

  // Cleanup runs even after an abort: without the caller's signal, with deadlines.
  const cleanupErrors: string[] = []
  const attempt = async (what: string, fn: () => Promise<void>): Promise<void> => {
    try { await fn() } catch (err) { cleanupErrors.push(`${what}: ${err instanceof Error ? err.message : String(err)}`) }
  }
  if (containerId !== undefined) {
    const id = containerId
    await attempt('StopContainer', async () => { await client.stopContainer(id, 0) })
    await attempt('RemoveContainer', async () => { await client.removeContainer(id) })
  }
  if (podSandboxId !== undefined) {
    const id = podSandboxId
    await attempt('StopPodSandbox', async () => { await client.stopPodSandbox(id) })
    await attempt('RemovePodSandbox', async () => { await client.removePodSandbox(id) })
  }
  if (ownLogDir) await rm(logDirectory, { recursive: true, force: true })
  timings.totalMs = performance.now() - started

  if (failure !== undefined || result === undefined || cleanupErrors.length > 0) {
    if (signal?.aborted === true && failure !== undefined) throw failure
    const what = failure !== undefined
      ? `${step} failed: ${failure instanceof Error ? failure.message : String(failure)}`
      : 'cleanup failed'
    const cleanup = cleanupErrors.length > 0 ? `\ncleanup errors:\n  ${cleanupErrors.join('\n  ')}` : ''
    const diagnostics = client.diagnostics !== undefined ? await client.diagnostics().catch(() => '') : ''
    throw new Error(`runPod ${name} (image ${options.image}): ${what}${cleanup}${diagnostics !== '' ? `\n${diagnostics}` : ''}`, { cause: failure })
  }
  return { ...result, podSandboxId: podSandboxId!, containerId: containerId!, timings }
}

async function waitForExit (client: CriClient, containerId: string, timeoutMs: number, pollMs: number, signal: AbortSignal | undefined, logFile: string): Promise<ContainerStatus> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const status = await client.containerStatus(containerId, { signal })
    if (status.state === 'CONTAINER_EXITED') return status
    if (performance.now() > deadline) {
      const log = await readFile(logFile, 'utf8').catch(() => undefined)
      const shown = log === undefined ? ' (no log file)' : log.trim() === '' ? ' (empty)' : `\n${tailLines(log, 20)}`
      throw new Error(`container ${containerId} did not exit within ${timeoutMs} ms (state ${status.state}); its log so far:${shown}`)
    }
    await new Promise(resolve => setTimeout(resolve, pollMs))
    signal?.throwIfAborted()
  }
}

/**
 * Splits a CRI container log into stdout and stderr. Each line is
 * `TIMESTAMP STREAM TAG CONTENT`, where TAG is F for a full line (a newline
 * followed it) or P for a partial one (the runtime split a long line, or the
 * output ended without a newline), possibly with more `:`-separated tags.
 */
export function parseCriLog (text: string): { stdout: string, stderr: string } {
  const out = { stdout: '', stderr: '' }
  for (const line of text.split('\n')) {
    if (line === '') continue
    const match = /^(\S+) (stdout|stderr) (\S+) ?(.*)$/.exec(line)
    if (match === null) throw new Error(`not a CRI log line: ${JSON.stringify(line)}`)
    const stream = match[2] as 'stdout' | 'stderr'
    const partial = match[3]!.split(':')[0] === 'P'
    out[stream] += match[4]! + (partial ? '' : '\n')
  }
  return out
}

export function tailLines (text: string, lines: number): string {
  return text.trimEnd().split('\n').slice(-lines).map(line => `  | ${line}`).join('\n')
}
