import { FormatError, NotFoundError, OriginError, UsageError } from '../errors.ts'
import { digestHex, parseDigest, type Digest } from '../oci/digest.ts'
import { Annotation, MediaType, type Descriptor, type ImageIndex } from '../oci/types.ts'
import { checkRange, contentLength, discard, failure, readBody, readRangeResponse, REQUEST_HEADERS, RetryingRequests, type RequestStats, type RetryOptions } from '../http/http-retry.ts'
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

/**
 * Retries, backoff, per-attempt timeout and concurrency (see RetryingRequests);
 * `indexTtlMs`: how long a read of index.json answers tag lookups (default 2 s:
 * a mount looks up the image's tag, then its signature's, with one read, which
 * halves what a burst of nodes asks the origin for tags; 0 reads it every time);
 * `redirectHosts`: hosts (`host` or `host:port`, the port defaulting to the scheme's)
 * that redirects may lead to besides the origin's own scheme, host and port, e.g. a
 * CDN or object store the origin hands blobs off to. Default none.
 */
export type HttpOriginOptions = RetryOptions & { indexTtlMs?: number, redirectHosts?: readonly string[] }

export const HTTP_ORIGIN_DEFAULTS = {
  /**
   * Redirects followed per request. A static origin that hands off to a CDN or an
   * object store needs one or two; more is a loop or a misconfiguration (browsers
   * and undici allow 20, which only makes a loop cost more requests).
   */
  maxRedirects: 5
} as const

const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308])

export type HttpOriginStats = RequestStats

const DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
const MAX_INDEX_BYTES = 16 * 1024 * 1024

export class HttpOrigin implements Origin {
  readonly name: string
  readonly stats: HttpOriginStats
  private readonly base: string
  private readonly requests: RetryingRequests
  private readonly indexTtlMs: number
  /** Where redirects may lead: the base's origin and the configured hosts, as `scheme://host:port`. */
  private readonly redirectOrigins: ReadonlySet<string>
  private recentIndex: { index: ImageIndex, at: number } | undefined

  constructor (baseUrl: string, options: HttpOriginOptions = {}) {
    let url: URL
    try { url = new URL(baseUrl) } catch {
      throw new UsageError(`origin URL "${baseUrl}" is not a URL; write e.g. http://host:8080/images/app`)
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UsageError(`origin URL "${baseUrl}" must start with http:// or https://`)
    if (url.search !== '' || url.hash !== '') throw new UsageError(`origin URL "${baseUrl}" must not have a query or fragment`)
    this.base = url.href.replace(/\/+$/, '')
    this.name = this.base
    this.requests = new RetryingRequests(options)
    this.indexTtlMs = options.indexTtlMs ?? 2000
    this.stats = this.requests.stats
    const origins = new Set([url.origin])
    for (const host of options.redirectHosts ?? []) {
      if (!/^[^/?#@\s]+$/.test(host)) throw new UsageError(`redirectHosts entry "${host}" must be a host or host:port, e.g. cdn.example.com or 10.0.0.5:9000`)
      // Same scheme as the origin: a redirect never downgrades https to http.
      let allowed: URL
      try { allowed = new URL(`${url.protocol}//${host}`) } catch { throw new UsageError(`redirectHosts entry "${host}" must be a host or host:port, e.g. cdn.example.com or 10.0.0.5:9000`) }
      origins.add(allowed.origin)
    }
    this.redirectOrigins = origins
  }

  /**
   * fetch, following redirects only to trusted origins (the base's, or redirectHosts):
   * left to itself, fetch follows any redirect to any host and port, so a compromised
   * or misconfigured origin could point agents at internal services. Digests protect
   * the bytes either way; this keeps the requests themselves where they were meant to go.
   */
  private async fetch (url: string, init: { method?: string, headers: Record<string, string>, signal: AbortSignal }): Promise<Response> {
    let target = url
    for (let redirects = 0; ; redirects++) {
      const res = await fetch(target, { ...init, redirect: 'manual' })
      if (!REDIRECT_STATUSES.has(res.status)) return res
      await discard(res)
      const location = res.headers.get('location')
      if (location === null) throw new OriginError(`${target} answered ${res.status} without a Location`, { status: res.status, retryable: false })
      if (redirects >= HTTP_ORIGIN_DEFAULTS.maxRedirects) throw new OriginError(`${url}: more than ${HTTP_ORIGIN_DEFAULTS.maxRedirects} redirects; fix the server's redirect loop`, { status: res.status, retryable: false })
      let next: URL
      try { next = new URL(location, target) } catch {
        throw new OriginError(`${target} redirected to "${location}", which is not a URL`, { status: res.status, retryable: false })
      }
      if (!this.redirectOrigins.has(next.origin)) {
        throw new OriginError(`${target} redirected to ${next.href}, which this origin does not trust: it follows redirects only within ${this.base}; serve the blobs from there, or trust that host: shoal agent --redirect-host ${next.host} (config key redirectHosts)`, { status: res.status, retryable: false })
      }
      target = next.href
    }
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
    const data = await this.requests.run(url, options.signal, async (signal, progress) => {
      const res = await this.fetch(url, { headers: { ...REQUEST_HEADERS }, signal })
      if (res.status !== 200) throw await failure(res, what, url)
      return await readBody(res, { max: options.maxBytes ?? DEFAULT_MAX_BLOB_BYTES }, what, url, progress)
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
    const data = await this.requests.run(url, options.signal, async (signal, progress) => {
      const res = await this.fetch(url, { headers: { ...REQUEST_HEADERS, Range: `bytes=${offset}-${last}` }, signal })
      const range = await readRangeResponse(res, offset, length, what, url, progress)
      if (range === undefined) throw await failure(res, `blob ${blob}`, url)
      return range
    })
    this.stats.bytesReceived += data.length
    return data
  }

  private blobUrl (blob: Digest): string {
    return `${this.base}/blobs/sha256/${digestHex(parseDigest(blob, 'blob digest'))}`
  }

  /** index.json, validated; with `optional`, undefined when the server has none (404). */
  private async readIndex (signal: AbortSignal | undefined, options: { optional?: boolean } = {}): Promise<ImageIndex | undefined> {
    const recent = this.recentIndex
    if (recent !== undefined && performance.now() - recent.at < this.indexTtlMs) return recent.index
    const url = `${this.base}/index.json`
    const text = await this.requests.run(url, signal, async attemptSignal => {
      const res = await this.fetch(url, { headers: { ...REQUEST_HEADERS }, signal: attemptSignal })
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
    this.recentIndex = { index, at: performance.now() }
    return index
  }

  private async headBlob (blob: Digest, signal: AbortSignal | undefined): Promise<number> {
    const url = this.blobUrl(blob)
    return await this.requests.run(url, signal, async attemptSignal => {
      const res = await this.fetch(url, { method: 'HEAD', headers: { ...REQUEST_HEADERS }, signal: attemptSignal })
      await discard(res)
      if (res.status !== 200) throw await failure(res, `blob ${blob}`, url)
      const size = contentLength(res)
      if (size === undefined) throw new OriginError(`blob ${blob}: ${url} sent no Content-Length for HEAD`, { status: 200, retryable: false })
      return size
    })
  }
}
