import { createHash } from 'node:crypto'
import { open, realpath, type FileHandle } from 'node:fs/promises'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join, sep } from 'node:path'
import { Readable, Transform, pipeline, type TransformCallback } from 'node:stream'
import { MediaType } from '../oci/types.ts'
import { errorText } from '../fetch/log.ts'
import { sleep } from './limit.ts'

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
 * Bodies are streamed from an open file handle (never read whole into memory),
 * through an optional token bucket that caps the bytes/s of all responses
 * together, so simulations can stand up a slow origin.
 */

export interface OriginServerStats {
  /** Requests received (any method, path or outcome). */
  requests: number
  /** Body bytes handed to sockets. */
  bytesSent: number
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
}

export interface OriginServerOptions extends OriginHandlerOptions {
  /** Default 127.0.0.1. */
  host?: string
  /** Default 0: any free port (read it from the result). */
  port?: number
  /** Aborting it closes the server. */
  signal?: AbortSignal
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
/** Agents hold connections across bursts of range requests; Node's default of 5 s is short. */
const KEEP_ALIVE_TIMEOUT_MS = 30_000

export async function startOriginServer (options: OriginServerOptions): Promise<OriginServer> {
  const handler = await createOriginHandler(options)
  const server = createServer(handler.handle)
  server.keepAliveTimeout = KEEP_ALIVE_TIMEOUT_MS

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
  const stats: OriginServerStats = { requests: 0, bytesSent: 0 }
  const bucket = options.rate === undefined ? undefined : new TokenBucket(options.rate)

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
        body: (start, end) => Readable.from([data.subarray(start, end + 1)]),
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
      // autoClose: the stream closes the handle when it ends, fails or is destroyed.
      body: (start, end) => file.handle.createReadStream({ start, end, autoClose: true }),
      close: () => { file.handle.close().catch(() => {}) }
    }, entry)
  }

  /**
   * Opens PATH if it is a regular file whose realpath is inside the served
   * directory; undefined (→ 404) when it is missing or escapes via a symlink.
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
    let handle: FileHandle
    try {
      handle = await open(real, 'r')
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
    const meter = new Meter(bucket, n => { stats.bytesSent += n; entry.bytes += n })
    pipeline(entity.body(start, end), meter, res, err => {
      // A client that hangs up mid-body is normal (aborted reads, closed agents).
      if (err !== undefined && err !== null && (err as NodeJS.ErrnoException).code !== 'ERR_STREAM_PREMATURE_CLOSE') entry.error = errorText(err)
    })
  }

  return { handle, stats }
}

interface Entity {
  size: number
  headers: Record<string, string>
  etag: string
  /** The bytes start..end inclusive, as HTTP ranges count them. */
  body: (start: number, end: number) => Readable
  /** Releases the file when no body will be sent (HEAD, 304, 416). */
  close: () => void
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

/**
 * A token bucket in "debt" form: each caller takes its bytes at once and then
 * sleeps until the bucket has paid them back. Callers queue up in call order
 * without a waiter list, and the long-run rate is `rate`, with bursts of at most
 * `burst` bytes (a tenth of a second's worth).
 */
export class TokenBucket {
  readonly rate: number
  readonly burst: number
  private tokens: number
  private last = performance.now()

  constructor (rate: number) {
    if (!(rate > 0) || !Number.isFinite(rate)) throw new RangeError(`rate must be a positive number of bytes per second, got ${rate}`)
    this.rate = rate
    this.burst = Math.max(1, rate / 10)
    this.tokens = this.burst
  }

  async take (n: number, signal?: AbortSignal): Promise<void> {
    const now = performance.now()
    this.tokens = Math.min(this.burst, this.tokens + (now - this.last) * this.rate / 1000)
    this.last = now
    this.tokens -= n
    if (this.tokens >= 0) return
    try {
      await sleep(-this.tokens * 1000 / this.rate, signal)
    } catch (err) {
      this.tokens += n // an aborted response gives back what it did not send
      throw err
    }
  }
}

/** Counts the bytes passing through and, with a bucket, paces them. */
class Meter extends Transform {
  private readonly bucket: TokenBucket | undefined
  private readonly count: (n: number) => void
  private readonly pieceSize: number
  private readonly abort = new AbortController()

  constructor (bucket: TokenBucket | undefined, count: (n: number) => void) {
    super()
    this.bucket = bucket
    this.count = count
    // Pace in pieces no larger than a burst, so a slow origin trickles evenly
    // instead of sending 64 KiB read buffers and then pausing for seconds.
    this.pieceSize = bucket === undefined ? Infinity : Math.min(64 * 1024, Math.max(1024, Math.floor(bucket.burst)))
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    if (this.bucket === undefined) {
      this.count(chunk.length)
      callback(null, chunk)
      return
    }
    this.pace(chunk, this.bucket).then(() => callback(), callback)
  }

  private async pace (chunk: Buffer, bucket: TokenBucket): Promise<void> {
    for (let at = 0; at < chunk.length; at += this.pieceSize) {
      const piece = chunk.subarray(at, at + this.pieceSize)
      await bucket.take(piece.length, this.abort.signal)
      this.count(piece.length)
      this.push(piece)
    }
  }

  override _destroy (error: Error | null, callback: (error?: Error | null) => void): void {
    this.abort.abort() // stop waiting for tokens once the client is gone
    callback(error)
  }
}
