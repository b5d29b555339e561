/**
 * The Snapshotter over gRPC on a unix socket: the service containerd's proxy
 * plugin calls (`[proxy_plugins.shoal] type = "snapshot" address = SOCKET`).
 *
 * Errors go out as the status codes containerd's errdefs.FromGRPC turns back into
 * its error classes (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
 * INVALID_ARGUMENT); anything else is UNKNOWN with the message. Every call has a
 * deadline: containerd holds locks around some of them, and a wedged call must
 * turn into an error, not a hung pull.
 *
 * Namespaces need no handling: containerd's metadata layer puts them into the
 * keys it sends (`<ns>/<n>/<key>`). (Debian's containerd 1.6.20 sends no
 * `containerd-namespace` metadata on these calls at all, only a user-agent.)
 */
import * as grpc from '@grpc/grpc-js'
import { mkdir, chmod, lstat, rm } from 'node:fs/promises'
import { connect } from 'node:net'
import { dirname, resolve } from 'node:path'
import { ShoalError, UsageError } from '../errors.ts'
import { errorText, silentLogger, type Logger } from '../util/log.ts'
import { SnapshotArgumentError, SnapshotExistsError, SnapshotNotFoundError, SnapshotStateError, SnapshotterClosedError } from './errors.ts'
import {
  snapshotsServiceDefinition, toTimestamp,
  type CommitRequest, type InfoResponse, type KeyRequest, type ListRequest, type ListResponse,
  type MountsResponse, type PrepareRequest, type UpdateRequest, type UsageResponse, type WireInfo
} from './proto.ts'
import type { Snapshotter } from './snapshotter.ts'
import type { Mount, SnapshotInfo } from './types.ts'

export interface ServeOptions {
  log?: Logger
  /** Longest a call may take before it fails with DEADLINE_EXCEEDED (default 2 minutes). */
  callTimeoutMs?: number
  /** How long close() lets calls in progress finish before cutting them (default 5 s). */
  shutdownTimeoutMs?: number
}

export interface SnapshotterServer {
  readonly socketPath: string
  close: () => Promise<void>
}

/** sun_path holds 108 bytes including the terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107
/** Infos per List message, as containerd's own snapshots service batches them. */
const LIST_BATCH = 100

export async function serveSnapshotter (snapshotter: Snapshotter, socketPath: string, options: ServeOptions = {}): Promise<SnapshotterServer> {
  const path = resolve(socketPath)
  const log = options.log ?? silentLogger
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
    throw new UsageError(`the snapshotter socket path ${path} is ${Buffer.byteLength(path)} bytes; unix sockets allow at most ${MAX_SOCKET_PATH_BYTES}: choose a shorter path`)
  }
  await mkdir(dirname(path), { recursive: true, mode: 0o700 })
  await removeStaleSocket(path)

  const server = new grpc.Server()
  server.addService(snapshotsServiceDefinition(), handlers(snapshotter, log, options.callTimeoutMs ?? 120_000))
  await new Promise<void>((resolveBind, reject) => {
    server.bindAsync(`unix://${path}`, grpc.ServerCredentials.createInsecure(), err => { if (err === null) resolveBind(); else reject(err) })
  }).catch((err: unknown) => {
    server.forceShutdown()
    throw new ShoalError('ESOCKET', `cannot listen on ${path}: ${errorText(err)}`, { cause: err })
  })
  // Only root (containerd) may drive the snapshotter. The socket exists with the
  // umask's mode for the moment between bind and this chmod.
  await chmod(path, 0o600)
  log.info({ socket: path }, 'snapshotter listening')

  let closing: Promise<void> | undefined
  return {
    socketPath: path,
    close: async () => {
      closing ??= (async () => {
        await new Promise<void>(resolveShutdown => {
          const timer = setTimeout(() => { server.forceShutdown(); resolveShutdown() }, options.shutdownTimeoutMs ?? 5_000)
          server.tryShutdown(() => { clearTimeout(timer); resolveShutdown() })
        })
        await rm(path, { force: true })
      })()
      await closing
    }
  }
}

/** A socket left by a killed agent is removed; one that still answers belongs to a live server and is not. */
async function removeStaleSocket (path: string): Promise<void> {
  const stats = await lstat(path).catch(() => undefined)
  if (stats === undefined) return
  if (!stats.isSocket()) throw new UsageError(`${path} exists and is not a socket; choose another snapshotter socket path`)
  const alive = await new Promise<boolean>(resolveProbe => {
    const socket = connect({ path })
    const done = (result: boolean): void => { socket.destroy(); resolveProbe(result) }
    socket.setTimeout(1_000, () => done(false))
    socket.once('connect', () => done(true))
    socket.once('error', () => done(false))
  })
  if (alive) throw new UsageError(`another process is serving ${path}; stop it or choose another snapshotter socket path`)
  await rm(path, { force: true })
}

type Unary<Req, Res> = grpc.handleUnaryCall<Req, Res>

function handlers (snapshotter: Snapshotter, log: Logger, timeoutMs: number): grpc.UntypedServiceImplementation {
  /** Runs FN with a signal that fires when the client cancels or the deadline passes, and answers no later than that. */
  const bounded = async <T>(call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>, method: string, fn: (signal: AbortSignal) => Promise<T>): Promise<T> => {
    const cancelled = new AbortController()
    const onCancel = (): void => cancelled.abort(new ShoalError('ECANCELLED', `${method} was cancelled by the client`))
    call.once('cancelled', onCancel)
    const deadline = AbortSignal.timeout(timeoutMs)
    const signal = AbortSignal.any([cancelled.signal, deadline])
    log.debug({ method }, 'snapshotter call')
    let onAbort!: () => void
    const aborted = new Promise<never>((_resolve, reject) => {
      onAbort = () => reject(deadline.aborted ? new DeadlineError(method, timeoutMs) : signal.reason)
      signal.addEventListener('abort', onAbort, { once: true })
    })
    try {
      // The call keeps running to its end (the snapshotter tracks it); the client is answered now.
      return await Promise.race([fn(signal), aborted])
    } finally {
      signal.removeEventListener('abort', onAbort)
      call.removeListener('cancelled', onCancel)
    }
  }

  const unary = <Req, Res>(method: string, fn: (request: Req, signal: AbortSignal) => Promise<Res>): Unary<Req, Res> => (call, callback) => {
    bounded(call, method, async signal => await fn(call.request, signal)).then(
      response => callback(null, response),
      (err: unknown) => callback(toStatus(err, method, log)))
  }

  const list: grpc.handleServerStreamingCall<ListRequest, ListResponse> = call => {
    bounded(call, 'List', async signal => await snapshotter.list(call.request.filters, { signal })).then(infos => {
      for (let i = 0; i < infos.length; i += LIST_BATCH) call.write({ info: infos.slice(i, i + LIST_BATCH).map(toWireInfo) })
      call.end()
    }, (err: unknown) => call.emit('error', toStatus(err, 'List', log)))
  }

  return {
    Prepare: unary<PrepareRequest, MountsResponse>('Prepare', async (req, signal) => ({ mounts: toWireMounts(await snapshotter.prepare(req.key, req.parent, req.labels, { signal })) })),
    View: unary<PrepareRequest, MountsResponse>('View', async (req, signal) => ({ mounts: toWireMounts(await snapshotter.view(req.key, req.parent, req.labels, { signal })) })),
    Mounts: unary<KeyRequest, MountsResponse>('Mounts', async (req, signal) => ({ mounts: toWireMounts(await snapshotter.mounts(req.key, { signal })) })),
    Commit: unary<CommitRequest, object>('Commit', async (req, signal) => { await snapshotter.commit(req.name, req.key, req.labels, { signal }); return {} }),
    Remove: unary<KeyRequest, object>('Remove', async (req, signal) => { await snapshotter.remove(req.key, { signal }); return {} }),
    Stat: unary<KeyRequest, InfoResponse>('Stat', async (req, signal) => ({ info: toWireInfo(await snapshotter.stat(req.key, { signal })) })),
    Update: unary<UpdateRequest, InfoResponse>('Update', async (req, signal) => {
      if (req.info === null) throw new SnapshotArgumentError('Update needs the snapshot info to apply')
      const info = await snapshotter.update({ name: req.info.name, labels: req.info.labels }, req.updateMask?.paths ?? [], { signal })
      return { info: toWireInfo(info) }
    }),
    List: list,
    Usage: unary<KeyRequest, UsageResponse>('Usage', async (req, signal) => await snapshotter.usage(req.key, { signal })),
    Cleanup: unary<object, object>('Cleanup', async (_req, signal) => { await snapshotter.cleanup({ signal }); return {} })
  }
}

class DeadlineError extends ShoalError {
  constructor (method: string, timeoutMs: number) {
    super('ETIMEDOUT', `${method} did not finish within ${timeoutMs} ms`)
  }
}

function toStatus (err: unknown, method: string, log: Logger): Partial<grpc.StatusObject> {
  const details = errorText(err)
  const code = err instanceof SnapshotNotFoundError ? grpc.status.NOT_FOUND
    : err instanceof SnapshotExistsError ? grpc.status.ALREADY_EXISTS
      : err instanceof SnapshotStateError ? grpc.status.FAILED_PRECONDITION
        : err instanceof SnapshotArgumentError ? grpc.status.INVALID_ARGUMENT
          : err instanceof SnapshotterClosedError ? grpc.status.UNAVAILABLE
            : err instanceof DeadlineError ? grpc.status.DEADLINE_EXCEEDED
              : err instanceof ShoalError && err.code === 'ECANCELLED' ? grpc.status.CANCELLED
                : grpc.status.UNKNOWN
  // The expected answers (a target that exists, a key that does not) are containerd's normal traffic.
  if (code === grpc.status.UNKNOWN || code === grpc.status.DEADLINE_EXCEEDED) log.warn({ method, err: details }, 'snapshotter call failed')
  return { code, details }
}

function toWireMounts (mounts: Mount[]): MountsResponse['mounts'] {
  return mounts.map(m => ({ type: m.type, source: m.source, target: '', options: m.options }))
}

function toWireInfo (info: SnapshotInfo): WireInfo {
  return { name: info.name, parent: info.parent, kind: info.kind, createdAt: toTimestamp(info.created), updatedAt: toTimestamp(info.updated), labels: info.labels }
}
