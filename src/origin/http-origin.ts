import { FormatError, NotFoundError, OriginError, UsageError } from '../errors.ts'
import { digestHex, parseDigest, type Digest } from '../format/digest.ts'
import { Annotation, MediaType, type Descriptor, type ImageIndex } from '../oci/types.ts'
import { Semaphore, sleep } from './limit.ts'
import type { Origin, OriginRequestOptions } from './origin.ts'

/**
 * An origin that is a plain static HTTP server holding an OCI image layout
 * (`startOriginServer`, nginx, a CDN, an object store): blobs are fetched from
 * `BASE/blobs/sha256/<hex>` and tags are looked up in `BASE/index.json`.
 *
 * Requests go through global fetch (undici), which keeps connections alive per
 * host by default; the semaphore bounds how many are in flight, so that is also
 * the number of connections this origin opens. Each attempt has its own timeout,
 * and failures that may go away (5xx, 408, 429, connection errors, timeouts,
 * truncated bodies) are retried with exponential backoff and jitter. Lengths are
 * checked exactly; digests are the caller's job (see Origin).
 */

export interface HttpOriginOptions {
  /** Extra attempts after the first one for retryable failures. Default 4. */
  retries?: number
  /** First backoff delay; it doubles on each retry up to maxDelayMs. Default 100. */
  baseDelayMs?: number
  /** Default 2000. */
  maxDelayMs?: number
  /** Deadline of one attempt, headers and body together (time queued for a slot not counted). Default 10000. */
  requestTimeoutMs?: number
  /** Most requests in flight at once from this origin. Default 8. */
  concurrency?: number
}

export interface HttpOriginStats {
  /** HTTP requests sent, retries included. */
  requests: number
  /** Retries after retryable failures. */
  retries: number
  /** Body bytes returned to callers (getBlob, getRange). */
  bytesReceived: number
}

const DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
const MAX_INDEX_BYTES = 16 * 1024 * 1024
/** A server that ignores Range sends the whole blob; we accept that only for small blobs. */
const MAX_UNRANGED_BODY_BYTES = 8 * 1024 * 1024

/**
 * `identity`: fetch otherwise asks for gzip/br and silently decompresses, which
 * would make lengths meaningless and ranges apply to the compressed bytes.
 */
const REQUEST_HEADERS = { 'Accept-Encoding': 'identity', 'User-Agent': 'shoal' }

export class HttpOrigin implements Origin {
  readonly name: string
  readonly stats: HttpOriginStats = { requests: 0, retries: 0, bytesReceived: 0 }
  private readonly base: string
  private readonly retries: number
  private readonly baseDelayMs: number
  private readonly maxDelayMs: number
  private readonly requestTimeoutMs: number
  private readonly limit: Semaphore

  constructor (baseUrl: string, options: HttpOriginOptions = {}) {
    let url: URL
    try { url = new URL(baseUrl) } catch {
      throw new UsageError(`origin URL "${baseUrl}" is not a URL; write e.g. http://host:8080/images/app`)
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UsageError(`origin URL "${baseUrl}" must start with http:// or https://`)
    if (url.search !== '' || url.hash !== '') throw new UsageError(`origin URL "${baseUrl}" must not have a query or fragment`)
    this.base = url.href.replace(/\/+$/, '')
    this.name = this.base
    this.retries = options.retries ?? 4
    this.baseDelayMs = options.baseDelayMs ?? 100
    this.maxDelayMs = options.maxDelayMs ?? 2000
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000
    this.limit = new Semaphore(options.concurrency ?? 8)
  }

  async resolve (ref: string, options: OriginRequestOptions = {}): Promise<Descriptor> {
    if (ref.startsWith('sha256:')) {
      const digest = parseDigest(ref, 'image reference')
      // Prefer the index entry (it has the real media type); a server that
      // publishes only blobs still works through a HEAD of the blob.
      const index = await this.readIndex(options.signal, { optional: true })
      const listed = index?.manifests.find(m => m.digest === digest)
      if (listed !== undefined) return listed
      const size = await this.headBlob(digest, options.signal)
      // The media type is a guess; the caller reads the manifest's own mediaType anyway.
      return { mediaType: MediaType.ociManifest, digest, size }
    }
    const index = (await this.readIndex(options.signal))!
    const found = index.manifests.filter(m => m.annotations?.[Annotation.refName] === ref)
    if (found.length === 0) {
      const tags = index.manifests.map(m => m.annotations?.[Annotation.refName]).filter(t => t !== undefined)
      throw new NotFoundError(`no image tagged "${ref}" at ${this.name} (tags: ${tags.length > 0 ? tags.join(', ') : 'none'})`)
    }
    return found[found.length - 1]! // like OciLayout.resolveTag: the last entry wins
  }

  async getBlob (blob: Digest, options: OriginRequestOptions & { maxBytes?: number } = {}): Promise<Uint8Array> {
    const url = this.blobUrl(blob)
    const what = `blob ${blob}`
    const data = await this.withRetries(url, options.signal, async signal => {
      const res = await fetch(url, { headers: REQUEST_HEADERS, signal })
      if (res.status !== 200) throw await failure(res, what, url)
      return await readBody(res, { max: options.maxBytes ?? DEFAULT_MAX_BLOB_BYTES }, what, url)
    })
    this.stats.bytesReceived += data.length
    return data
  }

  async getRange (blob: Digest, offset: number, length: number, options: OriginRequestOptions = {}): Promise<Uint8Array> {
    checkRange(offset, length)
    if (length === 0) return new Uint8Array(0)
    const url = this.blobUrl(blob)
    const last = offset + length - 1
    const what = `blob ${blob} bytes ${offset}-${last}`
    const data = await this.withRetries(url, options.signal, async signal => {
      const res = await fetch(url, { headers: { ...REQUEST_HEADERS, Range: `bytes=${offset}-${last}` }, signal })
      if (res.status === 206) {
        const got = parseContentRange(res.headers.get('content-range'))
        if (got === undefined || got.start !== offset || got.end !== last) {
          await discard(res)
          if (got !== undefined && got.start === offset && got.end < last) {
            throw new OriginError(`${what}: past the end of the blob (size ${got.size})`, { status: 206, retryable: false })
          }
          throw new OriginError(`${what}: ${url} answered Content-Range "${res.headers.get('content-range')}"`, { status: 206, retryable: false })
        }
        return await readBody(res, { exact: length, max: length }, what, url)
      }
      if (res.status === 200) {
        // The server ignored Range and sends the whole blob: fine for a small
        // one (python's http.server does this), an error for a large one.
        const declared = contentLength(res)
        if (declared !== undefined && declared > MAX_UNRANGED_BODY_BYTES) {
          await discard(res)
          throw new OriginError(`${what}: ${url} does not support Range requests (it sent the whole ${declared}-byte blob); serve the layout with a server that does, e.g. shoal's origin server or nginx`, { status: 200, retryable: false })
        }
        const whole = await readBody(res, { max: MAX_UNRANGED_BODY_BYTES }, `${what} (the server ignored Range and sent the whole blob)`, url)
        if (whole.length < offset + length) {
          throw new OriginError(`${what}: past the end of the blob (size ${whole.length})`, { status: 200, retryable: false })
        }
        // Copy, so the caller does not keep the rest of the blob alive.
        return whole.slice(offset, offset + length)
      }
      if (res.status === 416) {
        await discard(res)
        const size = /\/(\d+)$/.exec(res.headers.get('content-range') ?? '')?.[1]
        throw new OriginError(`${what}: past the end of the blob${size !== undefined ? ` (size ${size})` : ''}`, { status: 416, retryable: false })
      }
      throw await failure(res, `blob ${blob}`, url)
    })
    this.stats.bytesReceived += data.length
    return data
  }

  private blobUrl (blob: Digest): string {
    return `${this.base}/blobs/sha256/${digestHex(parseDigest(blob, 'blob digest'))}`
  }

  /** index.json, validated; with `optional`, undefined when the server has none (404). */
  private async readIndex (signal: AbortSignal | undefined, options: { optional?: boolean } = {}): Promise<ImageIndex | undefined> {
    const url = `${this.base}/index.json`
    const text = await this.withRetries(url, signal, async attemptSignal => {
      const res = await fetch(url, { headers: REQUEST_HEADERS, signal: attemptSignal })
      if (res.status === 404 && options.optional === true) { await discard(res); return undefined }
      if (res.status !== 200) throw await failure(res, 'index.json', url)
      return new TextDecoder().decode(await readBody(res, { max: MAX_INDEX_BYTES }, 'index.json', url))
    })
    if (text === undefined) return undefined
    let index: ImageIndex
    try { index = JSON.parse(text) as ImageIndex } catch (err) {
      throw new FormatError(`${url} is not valid JSON`, { cause: err })
    }
    if (index === null || typeof index !== 'object' || !Array.isArray(index.manifests)) throw new FormatError(`${url} has no manifests list`)
    for (const m of index.manifests) m.digest = parseDigest(m.digest, `${url} entry`)
    return index
  }

  private async headBlob (blob: Digest, signal: AbortSignal | undefined): Promise<number> {
    const url = this.blobUrl(blob)
    return await this.withRetries(url, signal, async attemptSignal => {
      const res = await fetch(url, { method: 'HEAD', headers: REQUEST_HEADERS, signal: attemptSignal })
      await discard(res)
      if (res.status !== 200) throw await failure(res, `blob ${blob}`, url)
      const size = contentLength(res)
      if (size === undefined) throw new OriginError(`blob ${blob}: ${url} sent no Content-Length for HEAD`, { status: 200, retryable: false })
      return size
    })
  }

  /** Runs ATTEMPT until it succeeds, fails for good, runs out of retries, or SIGNAL aborts. */
  private async withRetries<T> (url: string, signal: AbortSignal | undefined, attempt: (signal: AbortSignal) => Promise<T>): Promise<T> {
    for (let n = 0; ; n++) {
      try {
        return await this.attemptOnce(url, signal, attempt)
      } catch (err) {
        if (signal?.aborted === true) throw signal.reason
        if (!(err instanceof OriginError) || !err.retryable) throw err
        if (n >= this.retries) {
          throw new OriginError(`${err.message} (gave up after ${n + 1} attempts)`, { status: err.status, retryable: true, cause: err })
        }
        this.stats.retries++
        await sleep(this.backoff(n), signal)
      }
    }
  }

  /**
   * One attempt: holds a concurrency slot while the request and its body are in
   * flight (not while backing off), under the caller's signal plus a timeout.
   */
  private async attemptOnce<T> (url: string, signal: AbortSignal | undefined, attempt: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const release = await this.limit.acquire(signal)
    const timeout = AbortSignal.timeout(this.requestTimeoutMs)
    try {
      this.stats.requests++
      return await attempt(signal === undefined ? timeout : AbortSignal.any([signal, timeout]))
    } catch (err) {
      if (signal?.aborted === true) throw signal.reason
      if (timeout.aborted) {
        throw new OriginError(`${url}: no complete answer within ${this.requestTimeoutMs} ms`, { retryable: true, cause: err })
      }
      // undici reports refused/reset connections as TypeError('fetch failed') and
      // a body cut short as TypeError('terminated'), the detail in `cause`.
      if (err instanceof TypeError) {
        throw new OriginError(`${url}: ${networkErrorText(err)}`, { retryable: true, cause: err })
      }
      throw err
    } finally {
      release()
    }
  }

  /** Exponential with "equal jitter": half the step fixed, half random, so retries spread out but never fire at once. */
  private backoff (retry: number): number {
    const step = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** retry)
    return step / 2 + Math.random() * step / 2
  }
}

function checkRange (offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`invalid range: offset ${offset}, length ${length}`)
  }
}

/** The error for an unexpected status; drains the body so the connection can be reused or closed. */
async function failure (res: Response, what: string, url: string): Promise<OriginError> {
  await discard(res)
  const status = res.status
  if (status === 404) return new OriginError(`${what} not found at ${url}`, { status, retryable: false })
  const retryable = status >= 500 || status === 408 || status === 429
  return new OriginError(`${what}: ${url} answered ${status} ${res.statusText}`.trimEnd(), { status, retryable })
}

async function discard (res: Response): Promise<void> {
  await res.body?.cancel().catch(() => {})
}

function contentLength (res: Response): number | undefined {
  const value = res.headers.get('content-length')
  return value !== null && /^\d+$/.test(value) ? Number(value) : undefined
}

function parseContentRange (value: string | null): { start: number, end: number, size: number | undefined } | undefined {
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(value?.trim() ?? '')
  if (m === null) return undefined
  return { start: Number(m[1]), end: Number(m[2]), size: m[3] === '*' ? undefined : Number(m[3]) }
}

/**
 * Reads a response body into one buffer. `exact`: the body must be exactly this
 * long (shorter is a truncation, retryable); `max`: refuse anything longer,
 * without buffering it first.
 */
async function readBody (res: Response, limits: { exact?: number, max: number }, what: string, url: string): Promise<Uint8Array> {
  const encoding = res.headers.get('content-encoding')
  if (encoding !== null && encoding !== 'identity') {
    await discard(res)
    throw new OriginError(`${what}: ${url} sent a ${encoding}-encoded body although asked for identity`, { status: res.status, retryable: false })
  }
  const declared = contentLength(res)
  if (declared !== undefined && declared > limits.max) {
    await discard(res)
    throw new OriginError(`${what}: ${url} sent ${declared} bytes, more than the ${limits.max} expected`, { status: res.status, retryable: false })
  }
  const expected = limits.exact ?? declared
  let buffer = new Uint8Array(expected ?? Math.min(limits.max, 64 * 1024))
  let filled = 0
  if (res.body !== null) {
    // Leaving this loop by a throw cancels the stream, which releases the connection.
    for await (const chunk of res.body) {
      if (filled + chunk.length > limits.max) {
        throw new OriginError(`${what}: ${url} sent more than the ${limits.max} bytes expected`, { status: res.status, retryable: false })
      }
      if (filled + chunk.length > buffer.length) {
        const grown = new Uint8Array(Math.min(limits.max, Math.max(buffer.length * 2, filled + chunk.length)))
        grown.set(buffer.subarray(0, filled))
        buffer = grown
      }
      buffer.set(chunk, filled)
      filled += chunk.length
    }
  }
  if (expected !== undefined && filled !== expected) {
    throw new OriginError(`${what}: ${url} sent ${filled} of ${expected} bytes (truncated)`, { status: res.status, retryable: true })
  }
  return filled === buffer.length ? buffer : buffer.subarray(0, filled)
}

function networkErrorText (err: TypeError): string {
  const cause = err.cause
  if (err.message === 'terminated') return `connection closed mid-body${cause instanceof Error ? ` (${cause.message})` : ''}`
  if (cause instanceof Error) return `${err.message}: ${(cause as NodeJS.ErrnoException).code ?? cause.message}`
  return err.message
}
