import { FormatError, NotFoundError, OriginError, UsageError } from '../errors.ts'
import { digestHex, parseDigest, type Digest } from '../format/digest.ts'
import { Annotation, MediaType, type Descriptor, type ImageIndex } from '../oci/types.ts'
import { checkRange, contentLength, discard, failure, readBody, readRangeResponse, REQUEST_HEADERS, RetryingRequests, type RequestStats, type RetryOptions } from './http-retry.ts'
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
 * halves what a burst of nodes asks the origin for tags; 0 reads it every time).
 */
export type HttpOriginOptions = RetryOptions & { indexTtlMs?: number }

export type HttpOriginStats = RequestStats

const DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
const MAX_INDEX_BYTES = 16 * 1024 * 1024

export class HttpOrigin implements Origin {
  readonly name: string
  readonly stats: HttpOriginStats
  private readonly base: string
  private readonly requests: RetryingRequests
  private readonly indexTtlMs: number
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
      const res = await fetch(url, { headers: REQUEST_HEADERS, signal })
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
      const res = await fetch(url, { headers: { ...REQUEST_HEADERS, Range: `bytes=${offset}-${last}` }, signal })
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
    this.recentIndex = { index, at: performance.now() }
    return index
  }

  private async headBlob (blob: Digest, signal: AbortSignal | undefined): Promise<number> {
    const url = this.blobUrl(blob)
    return await this.requests.run(url, signal, async attemptSignal => {
      const res = await fetch(url, { method: 'HEAD', headers: REQUEST_HEADERS, signal: attemptSignal })
      await discard(res)
      if (res.status !== 200) throw await failure(res, `blob ${blob}`, url)
      const size = contentLength(res)
      if (size === undefined) throw new OriginError(`blob ${blob}: ${url} sent no Content-Length for HEAD`, { status: 200, retryable: false })
      return size
    })
  }
}
