import { OriginError } from '../errors.ts'
import { systemClock, type Clock } from '../util/clock.ts'
import { Semaphore } from '../util/limit.ts'

/**
 * What every HTTP client of shoal shares (HttpOrigin, the registry client): a
 * bound on requests in flight, a deadline per attempt, retries with backoff for
 * failures that may go away (5xx, 408, 429, connection errors, timeouts,
 * truncated bodies), and exact-length body reads. Responses are WHATWG
 * `Response`s, whether they come from global fetch or from node:https.
 */

export const RETRY_DEFAULTS = {
  /** Extra attempts after the first one for retryable failures. */
  retries: 4,
  /** First backoff delay (equal jitter); it doubles on each retry up to maxDelayMs. */
  baseDelayMs: 100,
  maxDelayMs: 2000,
  /** An attempt fails after this long without progress: no headers yet, or no more body bytes (time queued for a slot not counted). */
  requestTimeoutMs: 10_000,
  /** Most requests in flight at once. */
  concurrency: 8
} as const

/** Defaults: RETRY_DEFAULTS (the simulation model reads them too). */
export type RetryOptions = Partial<Record<keyof typeof RETRY_DEFAULTS, number>>

export interface RequestStats {
  /** Attempts (HTTP requests) sent, retries included; for the registry client an attempt may add an auth round trip or follow a redirect. */
  requests: number
  /** Retries after retryable failures. */
  retries: number
  /** Body bytes returned to callers. */
  bytesReceived: number
}

/**
 * `identity`: fetch otherwise asks for gzip/br and silently decompresses, which
 * would make lengths meaningless and ranges apply to the compressed bytes.
 */
export const REQUEST_HEADERS = { 'Accept-Encoding': 'identity', 'User-Agent': 'shoal' } as const

/** A server that ignores Range sends the whole blob; we accept that only for small blobs. */
const MAX_UNRANGED_BODY_BYTES = 8 * 1024 * 1024

/** Time and chance for the retry loop: the system's by default; the simulation model passes its own, and runs `retrying` and `acquire` in simulated time. */
export interface RetryEnvironment {
  clock?: Clock
  /** Uniform in [0, 1), for the backoff's jitter. */
  random?: () => number
}

/** One request and its body; calls `progress` as body bytes arrive (see `once`). */
export type Attempt<T> = (signal: AbortSignal, progress: () => void) => Promise<T>

export class RetryingRequests {
  readonly stats: RequestStats = { requests: 0, retries: 0, bytesReceived: 0 }
  readonly requestTimeoutMs: number
  private readonly retries: number
  private readonly baseDelayMs: number
  private readonly maxDelayMs: number
  private readonly limit: Semaphore
  private readonly clock: Clock
  private readonly random: () => number

  constructor (options: RetryOptions = {}, env: RetryEnvironment = {}) {
    this.retries = options.retries ?? RETRY_DEFAULTS.retries
    this.baseDelayMs = options.baseDelayMs ?? RETRY_DEFAULTS.baseDelayMs
    this.maxDelayMs = options.maxDelayMs ?? RETRY_DEFAULTS.maxDelayMs
    this.requestTimeoutMs = options.requestTimeoutMs ?? RETRY_DEFAULTS.requestTimeoutMs
    this.limit = new Semaphore(options.concurrency ?? RETRY_DEFAULTS.concurrency)
    this.clock = env.clock ?? systemClock
    this.random = env.random ?? Math.random
  }

  /** ATTEMPT (one request and its body) under retries: `retrying(() => once(...))`. */
  async run<T> (url: string, signal: AbortSignal | undefined, attempt: Attempt<T>): Promise<T> {
    return await this.retrying(signal, () => this.once(url, signal, attempt))
  }

  /**
   * Runs STEP until it succeeds, fails for good, runs out of retries, or SIGNAL
   * aborts. STEP may make several requests (an upload is a POST and a PUT),
   * each through `once`; a retry starts STEP over.
   */
  async retrying<T> (signal: AbortSignal | undefined, step: () => Promise<T>): Promise<T> {
    for (let n = 0; ; n++) {
      try {
        return await step()
      } catch (err) {
        await this.beforeRetry(err, n, signal)
      }
    }
  }

  /**
   * After failed attempt N (from 0): rethrows ERR unless it is worth retrying
   * (then with "gave up" once retries are used up), else waits out the backoff.
   * For callers that keep their own loop, such as a resumable download.
   */
  async beforeRetry (err: unknown, n: number, signal: AbortSignal | undefined): Promise<void> {
    if (signal?.aborted === true) throw signal.reason
    if (!(err instanceof OriginError) || !err.retryable) throw err
    if (n >= this.retries) {
      throw new OriginError(`${err.message} (gave up after ${n + 1} attempts)`, { status: err.status, retryable: true, cause: err })
    }
    this.stats.retries++
    await this.clock.sleep(this.backoff(n), signal)
  }

  /**
   * One attempt: holds a concurrency slot while the request and its body are in
   * flight (not while backing off), under the caller's signal plus a timeout
   * (`timeoutMs`, default requestTimeoutMs: an upload's deadline grows with its size).
   * The timeout counts time without progress: an attempt that reports each piece of
   * body it receives (`progress`) lives as long as bytes keep coming, so a slow but
   * working transfer (a fair share of a busy origin) is not cut off and retried.
   */
  async once<T> (url: string, signal: AbortSignal | undefined, attempt: Attempt<T>, options: { timeoutMs?: number } = {}): Promise<T> {
    const release = await this.limit.acquire(signal)
    const timeoutMs = options.timeoutMs ?? this.requestTimeoutMs
    const stalled = new AbortController()
    let timer = setTimeout(() => stalled.abort(), timeoutMs)
    const progress = (): void => {
      clearTimeout(timer)
      timer = setTimeout(() => stalled.abort(), timeoutMs)
    }
    try {
      this.stats.requests++
      return await attempt(signal === undefined ? stalled.signal : AbortSignal.any([signal, stalled.signal]), progress)
    } catch (err) {
      if (signal?.aborted === true) throw signal.reason
      if (stalled.signal.aborted) {
        throw new OriginError(`${url}: no answer, or no more bytes, for ${timeoutMs} ms`, { retryable: true, cause: err })
      }
      // undici reports refused/reset connections as TypeError('fetch failed') and
      // a body cut short as TypeError('terminated'), the detail in `cause`.
      if (err instanceof TypeError) {
        throw new OriginError(`${url}: ${networkErrorText(err)}`, { retryable: true, cause: err })
      }
      throw err
    } finally {
      clearTimeout(timer)
      release()
    }
  }

  /** A slot held across many reads, e.g. while a layer streams at its consumer's pace. */
  async acquire (signal: AbortSignal | undefined): Promise<() => void> {
    return await this.limit.acquire(signal)
  }

  /** Exponential with "equal jitter": half the step fixed, half random, so retries spread out but never fire at once. */
  private backoff (retry: number): number {
    const step = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** retry)
    return step / 2 + this.random() * step / 2
  }
}

export function checkRange (offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`invalid range: offset ${offset}, length ${length}`)
  }
}

export function isRetryableStatus (status: number): boolean {
  return status >= 500 || status === 408 || status === 429
}

/** The error for an unexpected status; drains the body so the connection can be reused or closed. */
export async function failure (res: Response, what: string, url: string): Promise<OriginError> {
  await discard(res)
  const status = res.status
  if (status === 404) return new OriginError(`${what} not found at ${url}`, { status, retryable: false })
  return new OriginError(`${what}: ${url} answered ${status} ${res.statusText}`.trimEnd(), { status, retryable: isRetryableStatus(status) })
}

export async function discard (res: Response): Promise<void> {
  await res.body?.cancel().catch(() => {})
}

export function contentLength (res: Response): number | undefined {
  const value = res.headers.get('content-length')
  return value !== null && /^\d+$/.test(value) ? Number(value) : undefined
}

function parseContentRange (value: string | null): { start: number, end: number, size: number | undefined } | undefined {
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(value?.trim() ?? '')
  if (m === null) return undefined
  return { start: Number(m[1]), end: Number(m[2]), size: m[3] === '*' ? undefined : Number(m[3]) }
}

/**
 * The bytes OFFSET..OFFSET+LENGTH of a blob from the answer to a Range request
 * (LENGTH > 0): 206 with exactly that Content-Range, 200 with the whole blob
 * (sliced, small blobs only), 416 past the end. Any other status is `undefined`,
 * for the caller to report; its body is left unread.
 */
export async function readRangeResponse (res: Response, offset: number, length: number, what: string, url: string, progress?: () => void): Promise<Uint8Array | undefined> {
  const last = offset + length - 1
  if (res.status === 206) {
    const got = parseContentRange(res.headers.get('content-range'))
    if (got === undefined || got.start !== offset || got.end !== last) {
      await discard(res)
      if (got !== undefined && got.start === offset && got.end < last) {
        throw new OriginError(`${what}: past the end of the blob (size ${got.size})`, { status: 206, retryable: false })
      }
      throw new OriginError(`${what}: ${url} answered Content-Range "${res.headers.get('content-range')}"`, { status: 206, retryable: false })
    }
    return await readBody(res, { exact: length, max: length }, what, url, progress)
  }
  if (res.status === 200) {
    // The server ignored Range and sends the whole blob: fine for a small
    // one (python's http.server does this), an error for a large one.
    const declared = contentLength(res)
    if (declared !== undefined && declared > MAX_UNRANGED_BODY_BYTES) {
      await discard(res)
      throw new OriginError(`${what}: ${url} does not support Range requests (it sent the whole ${declared}-byte blob); serve the layout with a server that does, e.g. shoal's origin server or nginx`, { status: 200, retryable: false })
    }
    const whole = await readBody(res, { max: MAX_UNRANGED_BODY_BYTES }, `${what} (the server ignored Range and sent the whole blob)`, url, progress)
    if (whole.length < offset + length) {
      throw new OriginError(`${what}: past the end of the blob (size ${whole.length})`, { status: 200, retryable: false })
    }
    // Copy, so the caller does not keep the rest of the blob alive.
    return whole.slice(offset, offset + length)
  }
  if (res.status === 416) {
    // The body is not worth reading: docker-registry even declares the whole blob's length for it.
    await discard(res)
    const size = /\/(\d+)$/.exec(res.headers.get('content-range') ?? '')?.[1]
    throw new OriginError(`${what}: past the end of the blob${size !== undefined ? ` (size ${size})` : ''}`, { status: 416, retryable: false })
  }
  return undefined
}

/**
 * Reads a response body into one buffer. `exact`: the body must be exactly this
 * long (shorter is a truncation, retryable); `max`: refuse anything longer,
 * without buffering it first.
 */
export async function readBody (res: Response, limits: { exact?: number, max: number }, what: string, url: string, progress?: () => void): Promise<Uint8Array> {
  await checkIdentityEncoding(res, what, url)
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
      progress?.()
    }
  }
  if (expected !== undefined && filled !== expected) {
    throw new OriginError(`${what}: ${url} sent ${filled} of ${expected} bytes (truncated)`, { status: res.status, retryable: true })
  }
  return filled === buffer.length ? buffer : buffer.subarray(0, filled)
}

/** Refuses a compressed body: lengths, ranges and digests all refer to the bytes as stored. */
export async function checkIdentityEncoding (res: Response, what: string, url: string): Promise<void> {
  const encoding = res.headers.get('content-encoding')
  if (encoding !== null && encoding !== 'identity') {
    await discard(res)
    throw new OriginError(`${what}: ${url} sent a ${encoding}-encoded body although asked for identity`, { status: res.status, retryable: false })
  }
}

function networkErrorText (err: TypeError): string {
  const cause = err.cause
  if (err.message === 'terminated') return `connection closed mid-body${cause instanceof Error ? ` (${cause.message})` : ''}`
  if (cause instanceof Error) return `${err.message}: ${(cause as NodeJS.ErrnoException).code ?? cause.message}`
  return err.message
}
