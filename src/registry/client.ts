import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { Readable } from 'node:stream'
import { FormatError, IntegrityError, NotFoundError, OriginError, UsageError } from '../errors.ts'
import { isDigest, parseDigest, sha256, type Digest } from '../oci/digest.ts'
import { checkIdentityEncoding, checkRange, contentLength, discard, isRetryableStatus, readBody, readRangeResponse, REQUEST_HEADERS, RetryingRequests, type RequestStats, type RetryOptions } from '../http/http-retry.ts'
import { MediaType, type Descriptor } from '../oci/types.ts'
import { pullScope, pushScope, RegistryAuth } from './auth.ts'
import { findCredentials, isDockerHub, parseCredentials, type Credentials } from './credentials.ts'
import { bytesBody, Transport } from './transport.ts'

/**
 * A client of one registry's distribution API (OCI distribution-spec v1.1):
 * manifests by tag or digest, blobs whole, by range or streamed, blob uploads
 * (monolithic, chunked, cross-repository mount) and manifest pushes.
 *
 * Everything fetched whose digest is known is checked against it; lengths are
 * exact. Requests are retried like HttpOrigin's (src/http/http-retry.ts), run
 * at most `concurrency` at a time, and take an AbortSignal. Redirects (blob
 * storage on S3, GCS, a CDN) are followed for GET and HEAD; the Authorization
 * header goes only to the registry itself, never to the host it redirects to.
 */

/** How to reach a registry: what users give on the command line or in the agent config. */
export interface RegistryAccess {
  /** USER:PASSWORD; without it, the docker/podman auth files are searched (src/registry/credentials.ts). */
  credentials?: string
  /** A PEM file of CA certificates to trust besides the system ones. */
  caFile?: string
  /** Plain HTTP instead of HTTPS. Never the default, not even for localhost. */
  plainHttp?: boolean
}

export interface RegistryClientOptions extends RetryOptions {
  /** HOST[:PORT] as in image references; `docker.io` means Docker Hub. */
  registry: string
  credentials?: Credentials
  /** Where the credentials came from, named in "refused" errors. */
  credentialSource?: string
  /** PEM text of extra CA certificates. */
  ca?: string
  plainHttp?: boolean
  /** Blobs larger than this are uploaded in PATCH chunks of this size. Default 64 MiB. */
  uploadChunkBytes?: number
}

/** Where a blob to push comes from: its bytes from START up to END (exclusive), as often as asked. */
export interface BlobSource {
  open: (start: number, end: number) => Readable
}

export type PushOutcome = 'present' | 'mounted' | 'uploaded'

const MANIFEST_ACCEPT = [MediaType.ociManifest, MediaType.ociIndex, MediaType.dockerManifest, MediaType.dockerManifestList].join(', ')
const MAX_MANIFEST_BYTES = 4 << 20
const DEFAULT_MAX_BLOB_BYTES = 64 << 20
const DEFAULT_UPLOAD_CHUNK_BYTES = 64 << 20
/** Slower uploads are taken for stalled ones (see uploadTimeout). */
const MIN_UPLOAD_BYTES_PER_SECOND = 256 << 10
const MAX_REDIRECTS = 5
/** Entries asked for per page of the catalog and tag lists. */
const LIST_PAGE_SIZE = 1000
/** The token scope of /v2/_catalog (distribution's token auth). */
const CATALOG_SCOPE = 'registry:catalog:*'
const MAX_ERROR_BODY_BYTES = 64 << 10
/** distribution-spec's repository name grammar; also keeps `..` and `?` out of URLs. */
const REPOSITORY_RE = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$/
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/

/** Opens a client for REGISTRY, reading the CA file and, unless given, the credentials for REPOSITORY from the auth files. */
export async function openRegistryClient (registry: string, repository: string, access: RegistryAccess = {}, options: RetryOptions & { uploadChunkBytes?: number } = {}): Promise<RegistryClient> {
  let credentials: Credentials | undefined
  let credentialSource: string | undefined
  if (access.credentials !== undefined) {
    credentials = parseCredentials(access.credentials, 'registry credentials')
    credentialSource = 'the command line or agent config'
  } else {
    const found = await findCredentials(registry, repository)
    credentials = found?.credentials
    credentialSource = found?.file
  }
  let ca: string | undefined
  if (access.caFile !== undefined) {
    try { ca = await readFile(access.caFile, 'utf8') } catch (err) {
      throw new UsageError(`cannot read the CA file ${access.caFile}: ${(err as Error).message}`)
    }
    if (!ca.includes('-----BEGIN CERTIFICATE-----')) throw new UsageError(`${access.caFile} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`)
  }
  return new RegistryClient({
    ...options,
    registry,
    ...(credentials !== undefined ? { credentials, credentialSource } : {}),
    ...(ca !== undefined ? { ca } : {}),
    plainHttp: access.plainHttp === true
  })
}

export class RegistryClient {
  /** HOST[:PORT] as the user wrote it. */
  readonly registry: string
  readonly stats: RequestStats
  private readonly base: URL
  private readonly transport: Transport
  private readonly requests: RetryingRequests
  private readonly auth: RegistryAuth
  private readonly uploadChunkBytes: number

  constructor (options: RegistryClientOptions) {
    this.registry = options.registry
    const host = isDockerHub(options.registry) ? 'registry-1.docker.io' : options.registry
    try { this.base = new URL(`${options.plainHttp === true ? 'http' : 'https'}://${host}`) } catch {
      throw new UsageError(`"${options.registry}" is not a registry host (write HOST or HOST:PORT)`)
    }
    if (this.base.host !== host.toLowerCase() || this.base.pathname !== '/') throw new UsageError(`"${options.registry}" is not a registry host (write HOST or HOST:PORT)`)
    this.requests = new RetryingRequests(options)
    this.stats = this.requests.stats
    this.transport = new Transport({ maxSockets: options.concurrency ?? 8, ...(options.ca !== undefined ? { ca: options.ca } : {}) })
    this.auth = new RegistryAuth({
      name: `docker://${options.registry}`,
      transport: this.transport,
      plainHttp: options.plainHttp === true,
      ...(options.credentials !== undefined ? { credentials: options.credentials } : {}),
      ...(options.credentialSource !== undefined ? { credentialSource: options.credentialSource } : {})
    })
    this.uploadChunkBytes = options.uploadChunkBytes ?? DEFAULT_UPLOAD_CHUNK_BYTES
  }

  /** `docker://HOST/REPO`, for messages. */
  nameOf (repository: string): string {
    return `docker://${this.registry}/${repository}`
  }

  /**
   * The descriptor of the manifest REFERENCE (a tag or a digest) points to, from
   * a HEAD: media type, digest, size. A GET is used only when the registry
   * leaves out Docker-Content-Digest. A missing tag or digest is a NotFoundError.
   */
  async resolveManifest (repository: string, reference: string, options: { signal?: AbortSignal } = {}): Promise<Descriptor> {
    const url = this.url(repository, 'manifests', checkReference(reference))
    const what = `manifest ${reference} in ${this.nameOf(repository)}`
    const head = await this.requests.run(url.href, options.signal, async signal => {
      const res = await this.send('HEAD', url, { scopes: [pullScope(this.path(repository))], headers: { Accept: MANIFEST_ACCEPT } }, signal)
      if (res.status === 404) throw await this.notFound(res, repository, reference)
      if (res.status !== 200) throw await this.failure(res, what, url)
      return { mediaType: mediaTypeOf(res), digest: res.headers.get('docker-content-digest'), size: contentLength(res) }
    })
    if (head.digest === null || !isDigest(head.digest) || head.size === undefined || head.mediaType === undefined) {
      return (await this.getManifest(repository, reference, options)).descriptor
    }
    if (isDigest(reference) && head.digest !== reference) throw new IntegrityError(what, `the registry answered for ${head.digest}`)
    return { mediaType: head.mediaType, digest: head.digest, size: head.size }
  }

  /** The manifest REFERENCE points to, its bytes checked against the digest asked for (or announced). */
  async getManifest (repository: string, reference: string, options: { signal?: AbortSignal } = {}): Promise<{ descriptor: Descriptor, bytes: Uint8Array }> {
    const url = this.url(repository, 'manifests', checkReference(reference))
    const what = `manifest ${reference} in ${this.nameOf(repository)}`
    const { bytes, announced, mediaType } = await this.requests.run(url.href, options.signal, async signal => {
      const res = await this.send('GET', url, { scopes: [pullScope(this.path(repository))], headers: { Accept: MANIFEST_ACCEPT } }, signal)
      if (res.status === 404) throw await this.notFound(res, repository, reference)
      if (res.status !== 200) throw await this.failure(res, what, url)
      const announced = res.headers.get('docker-content-digest')
      return { bytes: await readBody(res, { max: MAX_MANIFEST_BYTES }, what, url.href), announced, mediaType: mediaTypeOf(res) }
    })
    this.stats.bytesReceived += bytes.length
    const digest = sha256(bytes)
    const expected = isDigest(reference) ? reference : announced
    if (expected !== null && expected !== digest) throw new IntegrityError(what, `content hashes to ${digest}, not ${expected}; the registry or something between is corrupting data`)
    const declared = (parseJson(bytes, what) as { mediaType?: unknown }).mediaType
    const type = mediaType ?? (typeof declared === 'string' ? declared : undefined)
    if (type === undefined) throw new FormatError(`${what} has no media type (neither Content-Type nor mediaType)`)
    return { descriptor: { mediaType: type, digest, size: bytes.length }, bytes }
  }

  /** Every repository the registry lists in /v2/_catalog (following its Link pages). */
  async listRepositories (options: { signal?: AbortSignal } = {}): Promise<string[]> {
    return await this.listPages(new URL(`/v2/_catalog?n=${LIST_PAGE_SIZE}`, this.base), CATALOG_SCOPE, 'repositories', `the catalog of docker://${this.registry}`, options.signal)
  }

  /** Every tag of REPOSITORY (/v2/REPO/tags/list, following its Link pages). */
  async listTags (repository: string, options: { signal?: AbortSignal } = {}): Promise<string[]> {
    return await this.listPages(new URL(`/v2/${this.path(repository)}/tags/list?n=${LIST_PAGE_SIZE}`, this.base), pullScope(this.path(repository)), 'tags', `the tags of ${this.nameOf(repository)}`, options.signal)
  }

  /** Stores a manifest under REFERENCE (a tag, or its own digest); returns its digest. */
  async putManifest (repository: string, reference: string, bytes: Uint8Array, mediaType: string, options: { signal?: AbortSignal } = {}): Promise<Digest> {
    const url = this.url(repository, 'manifests', checkReference(reference))
    const what = `pushing manifest ${reference} to ${this.nameOf(repository)}`
    const digest = sha256(bytes)
    await this.requests.run(url.href, options.signal, async signal => {
      const res = await this.send('PUT', url, { scopes: [pushScope(this.path(repository))], headers: { 'Content-Type': mediaType, 'Content-Length': String(bytes.length) }, body: bytesBody(bytes) }, signal)
      if (res.status !== 201 && res.status !== 200) throw await this.failure(res, what, url)
      await discard(res)
      checkAnnounced(res, digest, what)
    })
    return digest
  }

  /** The size of blob DIGEST in REPOSITORY, or undefined when the repository does not have it. */
  async blobSize (repository: string, digest: Digest, options: { signal?: AbortSignal } = {}): Promise<number | undefined> {
    const url = this.url(repository, 'blobs', parseDigest(digest, 'blob digest'))
    return await this.requests.run(url.href, options.signal, async signal => {
      const res = await this.send('HEAD', url, { scopes: [pullScope(this.path(repository))], followRedirects: true }, signal)
      if (res.status === 404) return undefined
      if (res.status !== 200) throw await this.failure(res, `blob ${digest} in ${this.nameOf(repository)}`, url)
      const size = contentLength(res)
      if (size === undefined) throw new OriginError(`blob ${digest} in ${this.nameOf(repository)}: HEAD answered without Content-Length`, { status: 200, retryable: false })
      return size
    })
  }

  /** A whole blob, checked against its digest. */
  async getBlob (repository: string, digest: Digest, options: { signal?: AbortSignal, maxBytes?: number } = {}): Promise<Uint8Array> {
    const url = this.url(repository, 'blobs', parseDigest(digest, 'blob digest'))
    const what = `blob ${digest} in ${this.nameOf(repository)}`
    const data = await this.requests.run(url.href, options.signal, async (signal, progress) => {
      const res = await this.send('GET', url, { scopes: [pullScope(this.path(repository))], followRedirects: true }, signal)
      if (res.status !== 200) throw await this.failure(res, what, url)
      return await readBody(res, { max: options.maxBytes ?? DEFAULT_MAX_BLOB_BYTES }, what, url.href, progress)
    })
    this.stats.bytesReceived += data.length
    const actual = sha256(data)
    if (actual !== digest) throw new IntegrityError(what, `content hashes to ${actual}; the registry or something between is corrupting data`)
    return data
  }

  /** Exactly LENGTH bytes of a blob from OFFSET, by an HTTP Range request. */
  async getBlobRange (repository: string, digest: Digest, offset: number, length: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    checkRange(offset, length)
    if (length === 0) return new Uint8Array(0)
    const url = this.url(repository, 'blobs', parseDigest(digest, 'blob digest'))
    const what = `blob ${digest} bytes ${offset}-${offset + length - 1} in ${this.nameOf(repository)}`
    const data = await this.requests.run(url.href, options.signal, async (signal, progress) => {
      const res = await this.send('GET', url, { scopes: [pullScope(this.path(repository))], followRedirects: true, headers: { Range: `bytes=${offset}-${offset + length - 1}` } }, signal)
      const range = await readRangeResponse(res, offset, length, what, url.href, progress)
      if (range === undefined) throw await this.failure(res, what, url)
      return range
    })
    this.stats.bytesReceived += data.length
    return data
  }

  /**
   * A blob as a stream, for layers too large to hold: bounded memory, one
   * concurrency slot for as long as it is read. A connection lost midway is
   * resumed with a Range request from the byte reached (the retry budget resets
   * whenever bytes arrive); one that sends nothing for requestTimeoutMs counts
   * as lost. Only time spent waiting for the network counts, not the consumer's
   * time between chunks. Size and digest are checked at the end: a mismatch
   * fails the stream after its last byte, so a consumer must not trust what it
   * read until the stream has ended without error.
   */
  async * streamBlob (repository: string, blob: Descriptor, options: { signal?: AbortSignal } = {}): AsyncGenerator<Uint8Array> {
    const signal = options.signal
    const digest = parseDigest(blob.digest, 'blob digest')
    const url = this.url(repository, 'blobs', digest)
    const what = `blob ${digest} in ${this.nameOf(repository)}`
    const timeoutMs = this.requests.requestTimeoutMs
    const hash = createHash('sha256')
    let offset = 0
    const release = await this.requests.acquire(signal)
    try {
      for (let failures = 0; ; failures++) {
        const before = offset
        const connection = new AbortController()
        let stalled = false
        let timer: NodeJS.Timeout | undefined
        const waitForNetwork = async <T> (step: Promise<T>): Promise<T> => {
          timer = setTimeout(() => { stalled = true; connection.abort() }, timeoutMs)
          try { return await step } finally { clearTimeout(timer) }
        }
        try {
          this.stats.requests++
          const res = await waitForNetwork(this.send('GET', url, {
            scopes: [pullScope(this.path(repository))],
            followRedirects: true,
            headers: offset > 0 ? { Range: `bytes=${offset}-` } : {}
          }, signal === undefined ? connection.signal : AbortSignal.any([signal, connection.signal])))
          await this.checkStreamStart(res, offset, blob.size, what, url)
          const reader = res.body!.getReader()
          try {
            for (;;) {
              const next = await waitForNetwork(reader.read())
              if (next.done) break
              if (offset + next.value.length > blob.size) throw new IntegrityError(what, `the registry sent more than its ${blob.size} bytes`)
              hash.update(next.value)
              offset += next.value.length
              this.stats.bytesReceived += next.value.length
              yield next.value
            }
          } finally {
            await reader.cancel().catch(() => {})
          }
          if (offset !== blob.size) throw new OriginError(`${what}: ${url.href} sent ${offset} of ${blob.size} bytes (truncated)`, { status: res.status, retryable: true })
          break
        } catch (err) {
          if (offset > before) failures = 0 // progress: the connection was worth having
          const reported = stalled ? new OriginError(`${what}: no data from ${url.origin} for ${timeoutMs} ms`, { retryable: true, cause: err }) : err
          await this.requests.beforeRetry(reported, failures, signal)
        } finally {
          connection.abort()
        }
      }
    } finally {
      release()
    }
    const actual: Digest = `sha256:${hash.digest('hex')}`
    if (actual !== digest) throw new IntegrityError(what, `content hashes to ${actual}; the registry or something between is corrupting data`)
  }

  /**
   * Makes sure REPOSITORY has blob DESC: nothing to do if it is there (HEAD);
   * mounted from the first repository of MOUNTFROM on this registry that has it;
   * otherwise uploaded from SOURCE, in one PUT or, above the chunk size, in
   * PATCH chunks. A failed upload starts over with a new upload session.
   */
  async pushBlob (repository: string, desc: Descriptor, source: BlobSource, options: { mountFrom?: readonly string[], signal?: AbortSignal } = {}): Promise<PushOutcome> {
    const signal = options.signal
    const digest = parseDigest(desc.digest, 'blob digest')
    if (await this.blobSize(repository, digest, { signal }) !== undefined) return 'present'
    let session: URL | undefined
    for (const from of options.mountFrom ?? []) {
      if (from === repository || await this.mountCandidateSize(from, digest, signal) === undefined) continue
      const mounted = await this.mountBlob(repository, digest, from, signal)
      if (mounted === 'mounted') return 'mounted'
      session = mounted // the registry declined to mount but opened an upload session instead
      break
    }
    await this.requests.retrying(signal, async () => {
      const location = session ?? await this.startUpload(repository, signal)
      session = undefined // a retry needs a fresh session
      await this.upload(repository, desc, source, location, signal)
    })
    return 'uploaded'
  }

  /** Closes every connection; for when the client is done. */
  close (): void {
    this.transport.close()
  }

  /** The blob's size in another repository, or undefined when it is not there or we may not look. */
  private async mountCandidateSize (repository: string, digest: Digest, signal: AbortSignal | undefined): Promise<number | undefined> {
    try {
      return await this.blobSize(repository, digest, { signal })
    } catch (err) {
      if (err instanceof OriginError && (err.status === 401 || err.status === 403)) return undefined
      throw err
    }
  }

  private async mountBlob (repository: string, digest: Digest, from: string, signal: AbortSignal | undefined): Promise<'mounted' | URL> {
    const url = this.url(repository, 'blobs', 'uploads/')
    url.searchParams.set('mount', digest)
    url.searchParams.set('from', this.path(from))
    const what = `mounting blob ${digest} from ${from} into ${this.nameOf(repository)}`
    return await this.requests.run(url.href, signal, async attemptSignal => {
      const res = await this.send('POST', url, { scopes: [pushScope(this.path(repository)), pullScope(this.path(from))], headers: { 'Content-Length': '0' } }, attemptSignal)
      if (res.status === 201) { await discard(res); return 'mounted' as const }
      if (res.status === 202) { await discard(res); return uploadLocation(res, url, what) }
      throw await this.failure(res, what, url)
    })
  }

  private async startUpload (repository: string, signal: AbortSignal | undefined): Promise<URL> {
    const url = this.url(repository, 'blobs', 'uploads/')
    const what = `starting an upload to ${this.nameOf(repository)}`
    return await this.requests.once(url.href, signal, async attemptSignal => {
      const res = await this.send('POST', url, { scopes: [pushScope(this.path(repository))], headers: { 'Content-Length': '0' } }, attemptSignal)
      if (res.status !== 202) throw await this.failure(res, what, url)
      await discard(res)
      return uploadLocation(res, url, what)
    })
  }

  /** Sends the bytes to an upload session and closes it with the digest. */
  private async upload (repository: string, desc: Descriptor, source: BlobSource, session: URL, signal: AbortSignal | undefined): Promise<void> {
    const what = `uploading blob ${desc.digest} (${desc.size} bytes) to ${this.nameOf(repository)}`
    const scopes = [pushScope(this.path(repository))]
    let location = session
    let sent = 0
    if (desc.size > this.uploadChunkBytes) {
      // Chunked: for registries (or proxies in front of them) that cap the size of one request.
      while (sent < desc.size) {
        const end = Math.min(desc.size, sent + this.uploadChunkBytes)
        const start = sent
        location = await this.requests.once(location.href, signal, async attemptSignal => {
          const res = await this.send('PATCH', location, {
            scopes,
            headers: { 'Content-Type': 'application/octet-stream', 'Content-Length': String(end - start), 'Content-Range': `${start}-${end - 1}` },
            body: () => source.open(start, end)
          }, attemptSignal)
          if (res.status !== 202) throw await this.failure(res, what, location)
          await discard(res)
          return uploadLocation(res, location, what)
        }, { timeoutMs: this.uploadTimeout(end - start) })
        sent = end
      }
    }
    const final = new URL(location)
    final.searchParams.set('digest', desc.digest)
    await this.requests.once(final.href, signal, async attemptSignal => {
      const rest = sent < desc.size ? () => source.open(sent, desc.size) : bytesBody(new Uint8Array(0))
      const res = await this.send('PUT', final, {
        scopes,
        headers: { 'Content-Type': 'application/octet-stream', 'Content-Length': String(desc.size - sent) },
        body: rest
      }, attemptSignal)
      if (res.status !== 201) throw await this.failure(res, what, final)
      await discard(res)
      checkAnnounced(res, desc.digest, what)
    }, { timeoutMs: this.uploadTimeout(desc.size - sent) })
  }

  /** A paginated list (distribution-spec: `Link: <URL>; rel="next"`), the entries under KEY of each page. */
  private async listPages (first: URL, scope: string, key: string, what: string, signal: AbortSignal | undefined): Promise<string[]> {
    const all: string[] = []
    for (let url: URL | undefined = first; url !== undefined;) {
      const page: URL = url
      const { entries, next } = await this.requests.run(page.href, signal, async attemptSignal => {
        const res = await this.send('GET', page, { scopes: [scope] }, attemptSignal)
        if (res.status === 404 && key === 'tags') { await discard(res); return { entries: [], next: undefined } }
        if (res.status !== 200) throw await this.failure(res, what, page)
        const body = parseJson(await readBody(res, { max: MAX_MANIFEST_BYTES }, what, page.href), what) as Record<string, unknown> | null
        const list = body?.[key] ?? []
        if (!Array.isArray(list) || !list.every(x => typeof x === 'string')) throw new FormatError(`${what}: "${key}" is not a list of names`)
        const link = /<([^>]+)>\s*;\s*rel="?next"?/.exec(res.headers.get('link') ?? '')
        return { entries: list as string[], next: link !== null ? new URL(link[1]!, page) : undefined }
      })
      all.push(...entries)
      if (next !== undefined && next.origin !== this.base.origin) throw new OriginError(`${what}: the next page is on another host (${next.origin})`, { retryable: false })
      if (next?.href === page.href) throw new OriginError(`${what}: the registry names the same page as the next one (${page.href})`, { retryable: false })
      url = next
    }
    return all
  }

  /** An upload may take as long as sending BYTES at a slow but working pace, on top of the usual deadline. */
  private uploadTimeout (bytes: number): number {
    return this.requests.requestTimeoutMs + Math.ceil(bytes / MIN_UPLOAD_BYTES_PER_SECOND * 1000)
  }

  /**
   * One HTTP exchange with the registry: authorization (a 401 is answered once
   * with fresh credentials or a new token) and, when asked, redirects. Returns
   * the final response, whatever its status.
   */
  private async send (method: string, url: URL, request: { scopes: readonly string[], headers?: Record<string, string>, body?: () => Readable, followRedirects?: boolean }, signal: AbortSignal): Promise<Response> {
    let target = url
    let renewed = false
    for (let redirects = 0; ; ) {
      const toRegistry = target.origin === this.base.origin
      const authorization = toRegistry ? await this.auth.header(request.scopes, signal) : undefined
      const res = await this.transport.send(target, {
        method,
        headers: { ...REQUEST_HEADERS, ...request.headers, ...(authorization !== undefined ? { Authorization: authorization } : {}) },
        ...(request.body !== undefined ? { body: request.body } : {}),
        signal
      })
      if (res.status === 401 && toRegistry) {
        if (renewed) { await discard(res); throw this.auth.rejected() }
        await this.auth.challenged(res, request.scopes, signal)
        renewed = true
        continue
      }
      if (request.followRedirects === true && [301, 302, 303, 307, 308].includes(res.status)) {
        await discard(res)
        const location = res.headers.get('location')
        if (location === null) throw new OriginError(`${target.href} answered ${res.status} without a Location`, { status: res.status, retryable: false })
        if (++redirects > MAX_REDIRECTS) throw new OriginError(`${url.href}: more than ${MAX_REDIRECTS} redirects`, { status: res.status, retryable: false })
        target = new URL(location, target)
        continue
      }
      return res
    }
  }

  /** The first answer of a (resumed) streamed download: 200 from the start, or 206 from exactly where we were. */
  private async checkStreamStart (res: Response, offset: number, size: number, what: string, url: URL): Promise<void> {
    if (offset === 0 ? res.status !== 200 : res.status !== 206) {
      if (res.status === 200 || res.status === 206) {
        await discard(res)
        throw new OriginError(`${what}: resuming at byte ${offset}, ${url.href} answered ${res.status} ${res.headers.get('content-range') ?? ''}`.trimEnd(), { status: res.status, retryable: false })
      }
      throw await this.failure(res, what, url)
    }
    if (offset > 0 && res.headers.get('content-range')?.trim() !== `bytes ${offset}-${size - 1}/${size}`) {
      await discard(res)
      throw new OriginError(`${what}: resuming at byte ${offset}, ${url.href} answered Content-Range "${res.headers.get('content-range')}"`, { status: 206, retryable: false })
    }
    await checkIdentityEncoding(res, what, url.href)
  }

  private url (repository: string, kind: 'manifests' | 'blobs', rest: string): URL {
    return new URL(`/v2/${this.path(repository)}/${kind}/${rest}`, this.base)
  }

  /** The repository's name in API paths and token scopes: Docker Hub keeps official images under library/. */
  private path (repository: string): string {
    const name = checkRepository(repository)
    return isDockerHub(this.registry) && !name.includes('/') ? `library/${name}` : name
  }

  private async notFound (res: Response, repository: string, reference: string): Promise<NotFoundError> {
    const detail = await errorDetail(res)
    const kind = isDigest(reference) ? 'no manifest' : 'no image tagged'
    return new NotFoundError(`${kind} "${reference}" in ${this.nameOf(repository)}${detail !== '' ? ` (${detail})` : ''}`)
  }

  /** The error for an unexpected status, with the registry's own error codes (DENIED, NAME_UNKNOWN, ...). */
  private async failure (res: Response, what: string, url: URL): Promise<OriginError> {
    const detail = await errorDetail(res)
    const status = res.status
    const says = detail !== '' ? `: ${detail}` : ''
    if (status === 403) {
      return new OriginError(`${what}: access denied${says}; check that the credentials in use have access to this repository`, { status, retryable: false })
    }
    if (status === 404) return new OriginError(`${what}: not found at ${url.origin}${says}`, { status, retryable: false })
    return new OriginError(`${what}: ${url.origin} answered ${status} ${res.statusText}${says}`.replace(/ +:/, ':'), { status, retryable: isRetryableStatus(status) })
  }
}

/** The repository name, checked against the distribution grammar. */
function checkRepository (repository: string): string {
  if (!REPOSITORY_RE.test(repository)) throw new UsageError(`"${repository}" is not a valid repository name (lowercase letters, digits, separators . _ __ - and /)`)
  return repository
}

function checkReference (reference: string): string {
  if (isDigest(reference) || TAG_RE.test(reference)) return reference
  throw new UsageError(`"${reference}" is neither a tag nor a sha256 digest`)
}

function mediaTypeOf (res: Response): string | undefined {
  const type = res.headers.get('content-type')?.split(';')[0]?.trim()
  return type !== undefined && type !== '' && type !== 'application/octet-stream' && type !== 'application/json' ? type : undefined
}

function checkAnnounced (res: Response, digest: Digest, what: string): void {
  const announced = res.headers.get('docker-content-digest')
  if (announced !== null && announced !== digest) throw new IntegrityError(what, `the registry stored it as ${announced}, expected ${digest}`)
}

function uploadLocation (res: Response, requestUrl: URL, what: string): URL {
  const location = res.headers.get('location')
  if (location === null) throw new OriginError(`${what}: the registry answered ${res.status} without a Location`, { status: res.status, retryable: false })
  return new URL(location, requestUrl)
}

function parseJson (data: Uint8Array, what: string): unknown {
  try { return JSON.parse(Buffer.from(data).toString('utf8')) } catch (err) {
    throw new FormatError(`${what} is not valid JSON`, { cause: err })
  }
}

/** `CODE: message` of each entry of a distribution error body (`{"errors": [...]}`); '' when there is none. */
async function errorDetail (res: Response): Promise<string> {
  let text: string
  try {
    text = Buffer.from(await readBody(res, { max: MAX_ERROR_BODY_BYTES }, 'error body', res.url)).toString('utf8')
  } catch {
    await discard(res)
    return ''
  }
  try {
    const errors = (JSON.parse(text) as { errors?: Array<{ code?: unknown, message?: unknown }> }).errors
    if (Array.isArray(errors)) return errors.map(e => [e.code, e.message].filter(x => typeof x === 'string' && x !== '').join(': ')).join('; ')
  } catch { /* not JSON: fall through */ }
  return text.trim().slice(0, 200)
}
