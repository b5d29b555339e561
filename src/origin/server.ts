import { createHash } from 'node:crypto'
import { constants } from 'node:fs'
import { open, realpath, stat, type FileHandle } from 'node:fs/promises'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { join, sep } from 'node:path'
import { MediaType } from '../oci/types.ts'
import { errorText } from '../util/log.ts'
import { TokenBucket } from '../util/token-bucket.ts'
import { ORIGIN_SERVER_DEFAULTS } from './server-defaults.ts'

/**
 * A small static HTTP server for an OCI image layout directory, the simplest
 * origin shoal agents can pull from. It serves exactly three kinds of path:
 *
 *   /oci-layout, /index.json            Cache-Control: no-cache, ETag = sha256 of the content
 *   /blobs/sha256/<64 lowercase hex>    Cache-Control: immutable, ETag = the digest
 *
 * Everything else is 404; methods other than GET and HEAD are 405. Paths are
 * matched against fixed names and a regex, never joined from request text, and a
 * blob whose realpath leaves the directory (a symlink pointing out) is refused.
 *
 * Ranges: a single `bytes=a-b`, `bytes=a-` or `bytes=-n` gets 206 with
 * Content-Range; an unsatisfiable one gets 416 with the unsatisfied-range form
 * of Content-Range (`bytes *` then a slash and the size).
 * Multi-range requests are answered with a plain 200 and the full body, which
 * RFC 9110 allows (a server MAY ignore Range); shoal clients never send them.
 * HEAD ignores Range, as RFC 9110 requires (range handling is defined only for GET).
 *
 * Only regular files are served: a FIFO, device or directory under a blob name is a
 * 404 (files are opened non-blocking, so a FIFO cannot hang the open either).
 *
 * Bodies are sent from an open file handle in pieces (never read whole into memory),
 * through an optional token bucket that caps the bytes/s of all responses
 * together, so simulations can stand up a slow origin.
 *
 * Clients that stop reading (issue 15: 500 of them pinned 1,025 descriptors, ~210 MB
 * of memory and 1.7 GB of kernel TCP buffers for minutes, and a normal request waited
 * 6 s) are bounded by ORIGIN_SERVER_DEFAULTS:
 * - a send timeout: a response whose client takes no bytes for `sendTimeoutMs` is
 *   reset (RST, so the kernel drops its buffers at once), releasing its file too;
 * - fair sending: pieces are read and written a few at a time (`activePieces`), taken
 *   round-robin by client address, so a new client's request waits for a handful of
 *   pieces, not behind every open response, however many there are;
 * - connection caps (startOriginServer only): `maxConnections` in all (more are closed
 *   at accept) and `maxConnectionsPerClient` per address (more get 503 with Retry-After),
 *   and `headersTimeoutMs` for connections that never send a request.
 */

/** The server's limits (src/origin/server-defaults.ts); each is an option of startOriginServer / createOriginHandler. */
export { ORIGIN_SERVER_DEFAULTS }

export interface OriginServerStats {
  /** Requests received (any method, path or outcome). */
  requests: number
  /** Body bytes handed to sockets. */
  bytesSent: number
  /** Responses reset because their client took no bytes for sendTimeoutMs. */
  sendTimeouts: number
  /** Open connections (startOriginServer only). */
  connections: number
  /** Connections closed at accept because maxConnections were open (startOriginServer only). */
  refusedConnections: number
  /** Requests answered 503 because their client had maxConnectionsPerClient open (startOriginServer only). */
  refusedPerClient: number
}

export interface OriginRequestLog {
  method: string
  path: string
  status: number
  /** Body bytes sent for this request. */
  bytes: number
  ms: number
  /** Why a request failed on the server side (500/503, a refused symlink, a broken stream). */
  error?: string
}

export interface OriginHandlerOptions {
  /** The OCI image layout directory to serve. */
  dir: string
  /** Bandwidth cap in bytes per second, shared by all responses. Unlimited when absent. */
  rate?: number
  /** Called once per request when its response is finished or aborted. */
  log?: (entry: OriginRequestLog) => void
  /** See ORIGIN_SERVER_DEFAULTS. */
  sendTimeoutMs?: number
  /** See ORIGIN_SERVER_DEFAULTS. */
  activePieces?: number
}

export interface OriginServerOptions extends OriginHandlerOptions {
  /** Default 127.0.0.1. */
  host?: string
  /** Default 0: any free port (read it from the result). */
  port?: number
  /** Aborting it closes the server. */
  signal?: AbortSignal
  /** See ORIGIN_SERVER_DEFAULTS. */
  maxConnections?: number
  /** See ORIGIN_SERVER_DEFAULTS. */
  maxConnectionsPerClient?: number
  /** See ORIGIN_SERVER_DEFAULTS. */
  headersTimeoutMs?: number
}

export interface OriginServer {
  /** e.g. `http://127.0.0.1:43121`, no trailing slash. */
  readonly url: string
  readonly port: number
  readonly stats: OriginServerStats
  /** Stops listening and drops open connections, including responses in flight. */
  close (): Promise<void>
}

export interface OriginHandler {
  /** A request listener for node:http, usable inside another server too. */
  handle (req: IncomingMessage, res: ServerResponse): void
  readonly stats: OriginServerStats
}

const BLOB_PATH_RE = /^\/blobs\/sha256\/([0-9a-f]{64})$/
/** The only non-blob paths, with their content types (a Map: no prototype keys to trip over). */
const METADATA_FILES = new Map<string, string>([
  ['/oci-layout', 'application/json'],
  ['/index.json', MediaType.ociIndex]
])
const IMMUTABLE = 'public, max-age=31536000, immutable'

export async function startOriginServer (options: OriginServerOptions): Promise<OriginServer> {
  const maxConnections = positiveInteger(options.maxConnections ?? ORIGIN_SERVER_DEFAULTS.maxConnections, 'maxConnections')
  const perClient = positiveInteger(options.maxConnectionsPerClient ?? ORIGIN_SERVER_DEFAULTS.maxConnectionsPerClient, 'maxConnectionsPerClient')
  const handler = await createOriginHandler(options)
  const stats = handler.stats
  /** Admitted connections per client address; a connection over its client's cap is in `overCap` instead. */
  const perAddress = new Map<string, number>()
  const overCap = new WeakSet<Socket>()
  const server = createServer({ connectionsCheckingInterval: Math.min(30_000, Math.max(100, Math.floor((options.headersTimeoutMs ?? ORIGIN_SERVER_DEFAULTS.headersTimeoutMs) / 4))) }, (req, res) => {
    if (!overCap.has(req.socket)) { handler.handle(req, res); return }
    stats.requests++
    stats.refusedPerClient++
    const body = `503 too many connections from ${req.socket.remoteAddress ?? 'your address'}: at most ${perClient} at once; use fewer parallel connections, or retry later\n`
    res.writeHead(503, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(body), 'Retry-After': String(ORIGIN_SERVER_DEFAULTS.retryAfterS), Connection: 'close' })
    res.end(body)
    options.log?.({ method: req.method ?? '', path: pathOf(req.url ?? ''), status: 503, bytes: 0, ms: 0, error: `refused: more than ${perClient} connections from ${req.socket.remoteAddress}` })
  })
  server.keepAliveTimeout = ORIGIN_SERVER_DEFAULTS.keepAliveTimeoutMs
  server.headersTimeout = positiveInteger(options.headersTimeoutMs ?? ORIGIN_SERVER_DEFAULTS.headersTimeoutMs, 'headersTimeoutMs')
  server.maxConnections = maxConnections
  server.on('drop', () => { stats.refusedConnections++ })
  server.on('connection', (socket: Socket) => {
    const address = socket.remoteAddress ?? ''
    stats.connections++
    const n = perAddress.get(address) ?? 0
    if (n >= perClient) overCap.add(socket)
    else perAddress.set(address, n + 1)
    socket.once('close', () => {
      stats.connections--
      if (overCap.has(socket)) return
      const left = (perAddress.get(address) ?? 1) - 1
      if (left === 0) perAddress.delete(address)
      else perAddress.set(address, left)
    })
  })

  const host = options.host ?? '127.0.0.1'
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(options.port ?? 0, host, () => {
      server.off('error', reject)
      resolve()
    })
  })
  const port = (server.address() as AddressInfo).port

  let closing: Promise<void> | undefined
  const close = (): Promise<void> => {
    closing ??= new Promise<void>(resolve => {
      server.close(() => resolve())
      server.closeAllConnections()
    })
    return closing
  }
  if (options.signal !== undefined) {
    if (options.signal.aborted) await close()
    else options.signal.addEventListener('abort', () => { void close() }, { once: true })
  }

  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    port,
    stats: handler.stats,
    close
  }
}

/** The request handler of `startOriginServer`, for embedding in another node:http server. */
export async function createOriginHandler (options: OriginHandlerOptions): Promise<OriginHandler> {
  // Resolve DIR once: the symlink check compares every blob's realpath with it.
  const root = await realpath(options.dir)
  const blobDir = join(root, 'blobs', 'sha256')
  const stats: OriginServerStats = { requests: 0, bytesSent: 0, sendTimeouts: 0, connections: 0, refusedConnections: 0, refusedPerClient: 0 }
  const bucket = options.rate === undefined ? undefined : new TokenBucket(options.rate, { capacity: options.rate / 10 })
  const sendTimeoutMs = positiveInteger(options.sendTimeoutMs ?? ORIGIN_SERVER_DEFAULTS.sendTimeoutMs, 'sendTimeoutMs')
  const turns = new FairTurns(positiveInteger(options.activePieces ?? ORIGIN_SERVER_DEFAULTS.activePieces, 'activePieces'))
  // With a bucket, pieces no larger than a burst, so a slow origin trickles evenly
  // instead of sending 64 KiB and then pausing for seconds.
  const pieceBytes = bucket === undefined ? ORIGIN_SERVER_DEFAULTS.pieceBytes : Math.min(ORIGIN_SERVER_DEFAULTS.pieceBytes, Math.max(1024, Math.floor(bucket.capacity)))

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    const started = performance.now()
    stats.requests++
    const entry: OriginRequestLog = { method: req.method ?? '', path: pathOf(req.url ?? ''), status: 0, bytes: 0, ms: 0 }
    res.once('close', () => {
      entry.status = res.statusCode
      entry.ms = performance.now() - started
      options.log?.(entry)
    })
    serve(req, res, entry).catch((err: unknown) => {
      entry.error = errorText(err)
      if (res.headersSent) res.destroy()
      else sendStatus(res, transientFsError(err) ? 503 : 500)
    })
  }

  async function serve (req: IncomingMessage, res: ServerResponse, entry: OriginRequestLog): Promise<void> {
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      sendStatus(res, 405, { Allow: 'GET, HEAD' })
      return
    }
    const contentType = METADATA_FILES.get(entry.path)
    if (contentType !== undefined) {
      const file = await openInside(join(root, entry.path.slice(1)), entry)
      if (file === undefined) { sendStatus(res, 404); return }
      // Small and mutable: read it, so the ETag is the hash of exactly what is sent.
      let data: Buffer
      try { data = await file.handle.readFile() } finally { await file.handle.close() }
      const etag = `"sha256:${createHash('sha256').update(data).digest('hex')}"`
      sendEntity(req, res, {
        size: data.length,
        headers: { 'Content-Type': contentType, 'Cache-Control': 'no-cache', ETag: etag },
        etag,
        read: async (position, length) => data.subarray(position, position + length),
        close: () => {}
      }, entry)
      return
    }
    const match = BLOB_PATH_RE.exec(entry.path)
    if (match === null) { sendStatus(res, 404); return }
    // The file name is the regex-checked hex, so it cannot contain separators or dots.
    const file = await openInside(join(blobDir, match[1]!), entry)
    if (file === undefined) { sendStatus(res, 404); return }
    const etag = `"sha256:${match[1]!}"`
    sendEntity(req, res, {
      size: file.size,
      headers: { 'Content-Type': 'application/octet-stream', 'Cache-Control': IMMUTABLE, ETag: etag },
      etag,
      read: async (position, length) => {
        const piece = Buffer.allocUnsafe(length)
        const { bytesRead } = await file.handle.read(piece, 0, length, position)
        if (bytesRead !== length) throw new Error(`${entry.path}: the file ended at byte ${position + bytesRead} of ${file.size} (changed while being served)`)
        return piece
      },
      close: () => { file.handle.close().catch(() => {}) }
    }, entry)
  }

  /**
   * Opens PATH if it is a regular file whose realpath is inside the served
   * directory; undefined (→ 404) when it is missing, escapes via a symlink, or is
   * not a regular file. O_NONBLOCK: opening a FIFO for reading would otherwise wait
   * for a writer, holding the request and one of libuv's 4 file threads for good.
   */
  async function openInside (path: string, entry: OriginRequestLog): Promise<{ handle: FileHandle, size: number } | undefined> {
    let real: string
    try {
      real = await realpath(path)
    } catch (err) {
      if (missingFileError(err)) return undefined
      throw err
    }
    if (!real.startsWith(root + sep)) {
      entry.error = `refused: ${entry.path} resolves outside the served directory`
      return undefined
    }
    // Not even opened unless regular (opening a device can have effects); checked again
    // on the handle, in case the name was replaced in between.
    try {
      if (!(await stat(real)).isFile()) {
        entry.error = `refused: ${entry.path} is not a regular file`
        return undefined
      }
    } catch (err) {
      if (missingFileError(err)) return undefined
      throw err
    }
    let handle: FileHandle
    try {
      handle = await open(real, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY)
    } catch (err) {
      if (missingFileError(err)) return undefined
      throw err
    }
    try {
      const st = await handle.stat()
      if (st.isFile()) return { handle, size: st.size }
    } catch (err) {
      await handle.close()
      throw err
    }
    await handle.close()
    entry.error = `refused: ${entry.path} is not a regular file`
    return undefined
  }

  function sendEntity (req: IncomingMessage, res: ServerResponse, entity: Entity, entry: OriginRequestLog): void {
    const headers: Record<string, string | number> = { ...entity.headers, 'Accept-Ranges': 'bytes' }
    if (etagListMatches(req.headers['if-none-match'], entity.etag)) {
      entity.close()
      res.writeHead(304, headers).end()
      return
    }
    // HEAD ignores Range; If-Range with a validator that is not our ETag means "send it all".
    const ifRange = req.headers['if-range']
    const range = req.method === 'GET' && (ifRange === undefined || ifRange === entity.etag)
      ? parseRange(req.headers.range, entity.size)
      : undefined
    if (range === 'unsatisfiable') {
      entity.close()
      sendStatus(res, 416, { ...headers, 'Content-Range': `bytes */${entity.size}` })
      return
    }
    const start = range?.start ?? 0
    const end = range?.end ?? entity.size - 1
    if (range !== undefined) headers['Content-Range'] = `bytes ${start}-${end}/${entity.size}`
    headers['Content-Length'] = end - start + 1
    res.writeHead(range === undefined ? 200 : 206, headers)
    if (req.method === 'HEAD' || end < start) {
      entity.close()
      res.end()
      return
    }
    sendBody(req, res, entity, start, end, entry).catch((err: unknown) => {
      // A client that hangs up mid-body is normal (aborted reads, closed agents).
      if (!res.destroyed) entry.error = errorText(err)
      res.destroy()
    })
  }

  /**
   * Sends bytes START..END of ENTITY a piece at a time: each piece waits for its
   * client's turn (FairTurns), is read, paced by the bucket, and handed to the
   * socket; when the socket's buffer is full, the next piece waits for the client
   * to read (`drained`), at most sendTimeoutMs without progress.
   */
  async function sendBody (req: IncomingMessage, res: ServerResponse, entity: Entity, start: number, end: number, entry: OriginRequestLog): Promise<void> {
    const gone = new AbortController()
    const onClose = (): void => gone.abort()
    res.once('close', onClose)
    const client = req.socket.remoteAddress ?? ''
    try {
      for (let position = start; position <= end && !res.destroyed;) {
        const length = Math.min(pieceBytes, end + 1 - position)
        const release = await turns.turn(client, gone.signal)
        let piece: Uint8Array
        try {
          piece = await entity.read(position, length)
          await bucket?.take(length, gone.signal)
        } finally {
          release()
        }
        if (res.destroyed) return
        stats.bytesSent += length
        entry.bytes += length
        position += length
        if (!res.write(piece)) await drained(res, entry, 'drain')
      }
      if (res.destroyed) return
      // The tail may still sit in Node's buffer (the kernel's is full): watched until it is flushed.
      res.end()
      if (res.writableLength > 0) await drained(res, entry, 'finish')
    } catch (err) {
      if (gone.signal.aborted) return // the client went away while we waited
      throw err
    } finally {
      res.off('close', onClose)
      entity.close()
    }
  }

  /**
   * Resolves on RES's EVENT ('drain': it can take more; 'finish': all of it is flushed
   * to the kernel) or when it is gone; resets the connection after sendTimeoutMs
   * without progress.
   */
  async function drained (res: ServerResponse, entry: OriginRequestLog, event: 'drain' | 'finish'): Promise<void> {
    await new Promise<void>(resolve => {
      let buffered = res.writableLength
      let progressAt = performance.now()
      const check = setInterval(() => {
        if (res.writableLength < buffered) {
          buffered = res.writableLength
          progressAt = performance.now()
          return
        }
        if (performance.now() - progressAt < sendTimeoutMs) return
        stats.sendTimeouts++
        entry.error = `send timeout: the client took no bytes for ${sendTimeoutMs} ms; connection reset`
        // RST rather than FIN: the kernel frees the unsent buffers now instead of probing a closed window.
        const socket = res.socket
        if (socket !== null && typeof socket.resetAndDestroy === 'function') socket.resetAndDestroy()
        else res.destroy()
        done()
      }, Math.max(10, Math.min(1000, Math.floor(sendTimeoutMs / 4))))
      const done = (): void => {
        clearInterval(check)
        res.off(event, done)
        res.off('close', done)
        resolve()
      }
      res.once(event, done)
      res.once('close', done)
    })
  }

  return { handle, stats }
}

interface Entity {
  size: number
  headers: Record<string, string>
  etag: string
  /** Exactly LENGTH bytes from POSITION (a piece of the body). */
  read: (position: number, length: number) => Promise<Uint8Array>
  /** Releases the file: after the body, or when none will be sent (HEAD, 304, 416). */
  close: () => void
}

/**
 * Turns to send a piece, at most `limit` at once, granted round-robin by client
 * (then in request order within a client): a client with one request waits for
 * about one piece per other client, however many responses those have open.
 */
export class FairTurns {
  readonly limit: number
  private active = 0
  /** Waiters by client; Map order is the ring (a client served goes to the back). */
  private readonly waiting = new Map<string, Array<() => void>>()

  constructor (limit: number) {
    this.limit = limit
  }

  /** Waits for a turn; call the returned function when the piece is handed over. */
  async turn (client: string, signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted()
    if (this.active < this.limit && this.waiting.size === 0) {
      this.active++
      return this.releaser()
    }
    return await new Promise((resolve, reject) => {
      const grant = (): void => {
        signal?.removeEventListener('abort', onAbort)
        resolve(this.releaser())
      }
      const onAbort = (): void => {
        const queue = this.waiting.get(client)
        const at = queue?.indexOf(grant) ?? -1
        if (at >= 0) {
          queue!.splice(at, 1)
          if (queue!.length === 0) this.waiting.delete(client)
        }
        reject(signal!.reason)
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      const queue = this.waiting.get(client)
      if (queue === undefined) this.waiting.set(client, [grant])
      else queue.push(grant)
    })
  }

  private releaser (): () => void {
    let released = false
    return () => {
      if (released) return
      released = true
      this.active--
      this.next()
    }
  }

  private next (): void {
    while (this.active < this.limit && this.waiting.size > 0) {
      const [client, queue] = this.waiting.entries().next().value as [string, Array<() => void>]
      const grant = queue.shift()!
      this.waiting.delete(client)
      if (queue.length > 0) this.waiting.set(client, queue) // to the back of the ring
      this.active++
      grant()
    }
  }
}

/**
 * One single range of a `Range` header (RFC 9110 §14.1.2), clamped to SIZE.
 * undefined means "ignore the header and send everything": absent, malformed,
 * another unit, or several ranges (which we answer with the full body).
 */
export function parseRange (header: string | undefined, size: number): { start: number, end: number } | 'unsatisfiable' | undefined {
  if (header === undefined) return undefined
  const m = /^bytes=(\d*)-(\d*)$/i.exec(header.trim())
  if (m === null) return undefined
  const [, first, last] = m as unknown as [string, string, string]
  if (first === '' && last === '') return undefined
  if (first === '') {
    // Suffix range: the last N bytes.
    const n = Number(last)
    if (n === 0 || size === 0) return 'unsatisfiable'
    return { start: Math.max(0, size - n), end: size - 1 }
  }
  const start = Number(first)
  const end = last === '' ? Infinity : Number(last)
  if (end < start) return undefined // invalid range-spec: RFC 9110 says ignore it
  if (start >= size) return 'unsatisfiable'
  return { start, end: Math.min(end, size - 1) }
}

/** If-None-Match uses the weak comparison: `W/"x"` matches `"x"`; `*` matches anything. */
function etagListMatches (header: string | undefined, etag: string): boolean {
  if (header === undefined) return false
  return header.split(',').some(tag => {
    const t = tag.trim()
    return t === '*' || (t.startsWith('W/') ? t.slice(2) : t) === etag
  })
}

/** The path part of a request target, raw: percent-escapes are not decoded, so `%2e%2e` matches nothing. */
function pathOf (url: string): string {
  const q = url.indexOf('?')
  return q < 0 ? url : url.slice(0, q)
}

function sendStatus (res: ServerResponse, status: number, headers: Record<string, string | number> = {}): void {
  const body = `${status} ${status === 404 ? 'not found' : status === 405 ? 'method not allowed' : status === 416 ? 'range not satisfiable' : 'error'}\n`
  res.writeHead(status, { ...headers, 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(body) })
  res.end(body)
}

function missingFileError (err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP'
}

/** Out of file descriptors: the client should retry, so say 503 rather than 500. */
function transientFsError (err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code
  return code === 'EMFILE' || code === 'ENFILE' || code === 'EAGAIN'
}

function positiveInteger (value: number, name: string): number {
  if (!Number.isSafeInteger(value) || value <= 0) throw new RangeError(`${name} must be a positive integer, got ${value}`)
  return value
}
