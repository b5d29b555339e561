import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http'
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https'
import { Readable } from 'node:stream'
import { rootCertificates } from 'node:tls'
import { OriginError } from '../errors.ts'

/**
 * HTTP for the registry client, on node:http/node:https rather than global
 * fetch: a registry with its own CA needs `ca` on the TLS connection, which
 * fetch cannot take without the undici package. Answers are WHATWG Responses, so
 * the body helpers of src/http/http-retry.ts apply unchanged. Redirects are
 * not followed here: the client follows them itself, to decide which hosts see
 * the Authorization header.
 *
 * Failures come out as OriginErrors: connection errors and bodies cut short are
 * retryable; TLS verification failures are not, and say what to pass.
 */

export interface TransportOptions {
  /** PEM certificates trusted in addition to the system roots (a private registry's CA). */
  ca?: string
  /** Connections per host. */
  maxSockets: number
}

export interface TransportRequest {
  method: string
  headers: Record<string, string>
  /** A request body; a function is called once per send, so a retry can send it again. */
  body?: () => Readable
  signal: AbortSignal
}

/** Statuses whose responses never have a body (the Response constructor refuses one). */
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304])

/** Certificate errors a retry cannot fix (node's `code`s from OpenSSL). */
const TLS_VERIFY_CODES = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_GET_ISSUER_CERT', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID',
  'ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_UNTRUSTED', 'CERT_REJECTED'
])

export class Transport {
  private readonly http: HttpAgent
  private readonly https: HttpsAgent

  constructor (options: TransportOptions) {
    // Keep-alive sockets are unref'd while idle, so they never hold the process open.
    this.http = new HttpAgent({ keepAlive: true, maxSockets: options.maxSockets })
    // `ca` replaces the system roots: add them back, or a redirect to a public
    // object store (S3, GCS) would fail verification.
    const ca = options.ca !== undefined ? [...rootCertificates, options.ca] : undefined
    this.https = new HttpsAgent({ keepAlive: true, maxSockets: options.maxSockets, ...(ca !== undefined ? { ca } : {}) })
  }

  async send (url: URL, init: TransportRequest): Promise<Response> {
    const secure = url.protocol === 'https:'
    if (!secure && url.protocol !== 'http:') throw new OriginError(`${url.href}: only http and https URLs can be fetched`, { retryable: false })
    const body = init.body?.()
    return await new Promise<Response>((resolve, reject) => {
      const req = (secure ? httpsRequest : httpRequest)(url, {
        method: init.method,
        headers: init.headers,
        agent: secure ? this.https : this.http,
        signal: init.signal
      }, res => {
        resolve(toResponse(res, init.method, url.href))
      })
      req.on('error', err => {
        body?.destroy()
        reject(init.signal.aborted ? init.signal.reason : connectionError(err, url))
      })
      if (body === undefined) req.end()
      else {
        body.on('error', err => req.destroy(err))
        body.pipe(req)
      }
    })
  }

  /** Closes every connection, in use or idle: for when the client is done. */
  close (): void {
    this.http.destroy()
    this.https.destroy()
  }
}

function toResponse (res: IncomingMessage, method: string, url: string): Response {
  const status = res.statusCode ?? 0
  const headers = new Headers()
  for (let i = 0; i + 1 < res.rawHeaders.length; i += 2) headers.append(res.rawHeaders[i]!, res.rawHeaders[i + 1]!)
  if (method === 'HEAD' || NULL_BODY_STATUS.has(status)) {
    res.resume()
    return new Response(null, { status, statusText: res.statusMessage ?? '', headers })
  }
  return new Response(webBody(res, url), { status, statusText: res.statusMessage ?? '', headers })
}

/** The body as a web stream whose errors are retryable OriginErrors ("connection closed mid-body"). */
function webBody (res: IncomingMessage, url: string): ReadableStream<Uint8Array> {
  const chunks = res[Symbol.asyncIterator]() as AsyncIterator<Buffer>
  return new ReadableStream<Uint8Array>({
    async pull (controller) {
      try {
        const { value, done } = await chunks.next()
        if (done === true) controller.close()
        else controller.enqueue(new Uint8Array(value.buffer, value.byteOffset, value.byteLength))
      } catch (err) {
        controller.error(new OriginError(`${url}: connection closed mid-body (${(err as Error).message})`, { status: res.statusCode, retryable: true, cause: err }))
      }
    },
    cancel () { res.destroy() }
  }, { highWaterMark: 0 })
}

function connectionError (err: Error, url: URL): OriginError {
  const code = (err as NodeJS.ErrnoException).code ?? ''
  const text = err.message.split('\n')[0]!
  if (TLS_VERIFY_CODES.has(code)) {
    return new OriginError(`${url.origin}: the TLS certificate is not trusted (${code}: ${text}); if the registry uses a private CA, pass its certificate (--ca FILE, or --registry-ca FILE for agents)`, { retryable: false, cause: err })
  }
  if (/wrong version number|packet length too long/.test(text)) {
    return new OriginError(`${url.origin}: TLS handshake failed, the server does not speak TLS; if the registry is plain HTTP, say so with --plain-http (--registry-plain-http for agents)`, { retryable: false, cause: err })
  }
  return new OriginError(`${url.href}: ${code !== '' ? code : text}`, { retryable: true, cause: err })
}

/** A request body from bytes in memory. */
export const bytesBody = (data: Uint8Array): (() => Readable) => () => Readable.from([data])
