/**
 * Test harness for the snapshotter: a Snapshotter served on a unix socket and a
 * grpc-js client of the same proto (the wire containerd uses), mount(8) helpers
 * for the mounts it returns, and a fake RemoteLayers that bind-mounts a prepared
 * directory read-only where a real one would mount FUSE.
 */
import * as grpc from '@grpc/grpc-js'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { runTool } from '../helpers/exec.ts'
import { tempDir } from '../helpers/tmp.ts'
import type { Logger } from '../../src/util/log.ts'
import { snapshotsClientConstructor, type WireInfo, type WireMount } from '../../src/snapshotter/proto.ts'
import type { RemoteLayer, RemoteLayers, RemoteLayerState } from '../../src/snapshotter/remote-layers.ts'
import { serveSnapshotter, type ServeOptions, type SnapshotterServer } from '../../src/snapshotter/service.ts'
import { Snapshotter } from '../../src/snapshotter/snapshotter.ts'

export interface Harness {
  root: string
  socket: string
  snapshotter: Snapshotter
  server: SnapshotterServer
  client: SnapshotsClient
  logs: LogEntry[]
  /** Closes client, server and snapshotter (idempotent); the root stays for a reopen. */
  stop: () => Promise<void>
}

export interface LogEntry { level: string, message: string, fields: object }

/**
 * Starts a snapshotter at ROOT and a client for it; the socket is ROOT.sock. Without
 * ROOT, a fresh temp dir (so call it in a test, not a hook: tempDir's cleanup is
 * tied to where it is called).
 */
export async function startHarness (options: { root?: string, remote?: RemoteLayers, serve?: ServeOptions } = {}): Promise<Harness> {
  const root = options.root ?? join(await tempDir('shoal-snap-'), 'root')
  const socket = `${root}.sock`
  const logs: LogEntry[] = []
  const log = collectingLogger(logs)
  const snapshotter = await Snapshotter.open({ root, remote: options.remote, log })
  const server = await serveSnapshotter(snapshotter, socket, { log, ...options.serve })
  const client = new SnapshotsClient(socket)
  let stopped: Promise<void> | undefined
  return {
    root,
    socket,
    snapshotter,
    server,
    client,
    logs,
    stop: async () => {
      stopped ??= (async () => {
        client.close()
        await server.close()
        await snapshotter.close()
      })()
      await stopped
    }
  }
}

function collectingLogger (logs: LogEntry[]): Logger {
  const at = (level: string) => (fields: object, message: string): void => { logs.push({ level, message, fields }) }
  return { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') }
}

/** A gRPC failure as the client sees it. */
export interface CallError extends Error { code: grpc.status, details: string }

const Client = snapshotsClientConstructor()

/** Promise wrappers over the generated client; every call has a 30 s deadline. */
export class SnapshotsClient {
  private readonly client: grpc.Client & Record<string, (...args: unknown[]) => unknown>

  constructor (socket: string) {
    this.client = new Client(`unix://${socket}`, grpc.credentials.createInsecure()) as grpc.Client & Record<string, (...args: unknown[]) => unknown>
  }

  close (): void { this.client.close() }

  async call<T = unknown> (method: string, request: object, metadata = namespaceMetadata()): Promise<T> {
    return await new Promise<T>((resolve, reject) => {
      this.client[method]!(request, metadata, { deadline: Date.now() + 30_000 }, (err: grpc.ServiceError | null, response: T) => {
        if (err === null) resolve(response); else reject(err)
      })
    })
  }

  async prepare (key: string, parent = '', labels: Record<string, string> = {}): Promise<WireMount[]> {
    return (await this.call<{ mounts: WireMount[] }>('Prepare', { key, parent, labels })).mounts
  }

  async view (key: string, parent = '', labels: Record<string, string> = {}): Promise<WireMount[]> {
    return (await this.call<{ mounts: WireMount[] }>('View', { key, parent, labels })).mounts
  }

  async mounts (key: string): Promise<WireMount[]> {
    return (await this.call<{ mounts: WireMount[] }>('Mounts', { key })).mounts
  }

  async commit (name: string, key: string, labels: Record<string, string> = {}): Promise<void> {
    await this.call('Commit', { name, key, labels })
  }

  async remove (key: string): Promise<void> { await this.call('Remove', { key }) }

  async stat (key: string): Promise<WireInfo> {
    return (await this.call<{ info: WireInfo }>('Stat', { key })).info
  }

  async update (info: Partial<WireInfo> & { name: string }, paths?: string[]): Promise<WireInfo> {
    const request = paths === undefined ? { info } : { info, updateMask: { paths } }
    return (await this.call<{ info: WireInfo }>('Update', request)).info
  }

  async usage (key: string): Promise<{ size: number, inodes: number }> {
    return await this.call('Usage', { key })
  }

  async cleanup (): Promise<void> { await this.call('Cleanup', {}) }

  /** Every Info the List stream sends, with how many messages carried them. */
  async list (filters: string[] = []): Promise<{ infos: WireInfo[], messages: number }> {
    return await new Promise((resolve, reject) => {
      const infos: WireInfo[] = []
      let messages = 0
      const stream = this.client.List!({ filters }, namespaceMetadata(), { deadline: Date.now() + 30_000 }) as grpc.ClientReadableStream<{ info: WireInfo[] }>
      stream.on('data', (message: { info: WireInfo[] }) => { messages++; infos.push(...message.info) })
      stream.on('error', reject)
      stream.on('end', () => resolve({ infos, messages }))
    })
  }
}

/** What containerd sends with every call. */
function namespaceMetadata (): grpc.Metadata {
  const metadata = new grpc.Metadata()
  metadata.set('containerd-namespace', 'default')
  return metadata
}

/** The gRPC status of a failed call (fails the test if the call succeeded). */
export async function statusOf (promise: Promise<unknown>): Promise<CallError> {
  try {
    await promise
  } catch (err) {
    if (typeof (err as CallError).code === 'number') return err as CallError
    throw err
  }
  throw new Error('the call succeeded, but an error was expected')
}

/** Mounts what the snapshotter returned at TARGET, as containerd would (one mount here). */
export async function mountAll (mounts: WireMount[], target: string): Promise<void> {
  for (const m of mounts) {
    if (m.type === 'bind') await runTool('mount', ['-o', m.options.join(','), m.source, target], { timeoutMs: 30_000 })
    else await runTool('mount', ['-t', m.type, '-o', m.options.join(','), m.source, target], { timeoutMs: 30_000 })
  }
}

export async function unmount (target: string): Promise<void> {
  await runTool('umount', [target], { timeoutMs: 30_000 })
}

/** Mounts MOUNTS at a fresh directory, runs FN on it, and always unmounts. */
export async function withMounted<T> (mounts: WireMount[], fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await tempDir('shoal-snap-mnt-')
  await mountAll(mounts, dir)
  try {
    return await fn(dir)
  } finally {
    await unmount(dir)
  }
}

/** Whether anything is mounted exactly at PATH. */
export async function isMountpoint (path: string): Promise<boolean> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  return mountinfo.split('\n').some(line => line.split(' ')[4] === path)
}

export const TARGET_LABEL = 'containerd.io/snapshot.ref'

interface FakeLayer { files: Record<string, string>, size: number, inodes: number }

/**
 * A RemoteLayers that serves layers it was given with `add`: prepare bind-mounts
 * the layer's directory read-only at `dir` (a real mount, as FUSE would be), so
 * the snapshotter's unmount-before-delete path is exercised for real.
 */
export class FakeRemoteLayers implements RemoteLayers {
  readonly prepared: Array<{ key: string, parent: string, target: string, labels: Record<string, string>, dir: string }> = []
  readonly restored: Array<{ state: RemoteLayerState, dir: string }> = []
  readonly released: string[] = []
  /** 'mount' serves known targets; 'decline' resolves undefined; 'throw' rejects; 'hang' waits for the abort. */
  mode: 'mount' | 'decline' | 'throw' | 'hang' = 'mount'
  failRestore = false
  /** Delay before prepare mounts, to overlap concurrent Prepares. */
  delayMs = 0
  private readonly sources: string
  private readonly layers = new Map<string, FakeLayer>()
  private readonly mounted = new Set<string>()
  lastSignal: AbortSignal | undefined

  constructor (sources: string) { this.sources = sources }

  /** A layer for TARGET with FILES (name → content). */
  async add (target: string, files: Record<string, string>): Promise<void> {
    const dir = this.sourceDir(target)
    await mkdir(dir, { recursive: true })
    for (const [name, content] of Object.entries(files)) await writeFile(join(dir, name), content)
    this.layers.set(target, { files, size: 4096 * Object.keys(files).length, inodes: Object.keys(files).length + 1 })
  }

  layer (target: string): FakeLayer | undefined { return this.layers.get(target) }

  async prepare (request: { key: string, parent: string, target: string, labels: Record<string, string>, dir: string }, options: { signal?: AbortSignal } = {}): Promise<RemoteLayer | undefined> {
    this.prepared.push(request)
    this.lastSignal = options.signal
    if (this.delayMs > 0) await new Promise(resolve => setTimeout(resolve, this.delayMs))
    if (this.mode === 'throw') throw new Error('the fake registry is unreachable')
    if (this.mode === 'hang') {
      return await new Promise((_resolve, reject) => {
        options.signal?.addEventListener('abort', () => reject(options.signal!.reason), { once: true })
      })
    }
    const layer = this.layers.get(request.target)
    if (this.mode === 'decline' || layer === undefined) return undefined
    await this.mount(request.target, request.dir)
    return { state: { target: request.target }, size: layer.size, inodes: layer.inodes }
  }

  async restore (state: RemoteLayerState, dir: string): Promise<void> {
    this.restored.push({ state, dir })
    if (this.failRestore) throw new Error('the fake layer is gone')
    await this.mount(state.target as string, dir)
  }

  async release (dir: string): Promise<void> {
    this.released.push(dir)
    if (!this.mounted.has(dir)) return
    await runTool('umount', [dir], { timeoutMs: 30_000 })
    this.mounted.delete(dir)
  }

  /** Where the layer's files are (what the fake mounts). */
  sourceDir (target: string): string { return join(this.sources, target.replace(/[^a-z0-9]/gi, '_')) }

  private async mount (target: string, dir: string): Promise<void> {
    await runTool('mount', ['-o', 'ro,bind', this.sourceDir(target), dir], { timeoutMs: 30_000 })
    this.mounted.add(dir)
  }
}
