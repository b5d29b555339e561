import { OriginError } from '../errors.ts'
import { discard, isRetryableStatus, readBody, REQUEST_HEADERS } from '../http/http-retry.ts'
import type { Credentials } from './credentials.ts'
import type { Transport } from './transport.ts'

/**
 * Registry authentication as the distribution spec and docker do it: a request
 * goes out anonymous; a 401 carries a WWW-Authenticate challenge, either
 * `Basic` (send the credentials with every request) or `Bearer realm=...,
 * service=...,scope=...` (get a token for the scopes from the realm, with the
 * credentials if there are any, and send that). Tokens are cached per set of
 * scopes until shortly before they expire; once the registry is known to want
 * tokens, one is fetched before the request instead of after a 401. A 401 on a
 * request that already carried fresh authorization means the credentials are
 * wrong or lack access, and is reported as such.
 *
 * Concurrent first requests may each fetch a token (at most the client's
 * concurrency); that is cheaper than coordinating them.
 */

export interface Challenge {
  scheme: string
  params: Record<string, string>
}

/** Parses a WWW-Authenticate header, which may hold several challenges. */
export function parseChallenges (header: string): Challenge[] {
  const challenges: Challenge[] = []
  // A token followed by `=value` is a parameter of the current challenge; a bare token starts a new one.
  const re = /\s*([A-Za-z0-9!#$%&'*+.^_`|~-]+)(?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*)))?\s*,?/y
  let m: RegExpExecArray | null
  while (re.lastIndex < header.length && (m = re.exec(header)) !== null) {
    const [, token, quoted, bare] = m
    if (quoted === undefined && bare === undefined) challenges.push({ scheme: token!.toLowerCase(), params: {} })
    else if (challenges.length > 0) challenges[challenges.length - 1]!.params[token!.toLowerCase()] = quoted?.replace(/\\(.)/g, '$1') ?? bare!
  }
  return challenges
}

export interface RegistryAuthOptions {
  /** For messages: `docker://HOST`. */
  name: string
  credentials?: Credentials
  /** Where the credentials came from, for messages ("--creds", an auth file path). */
  credentialSource?: string
  /** The registry itself is plain HTTP by the user's choice, so a plain-HTTP token realm is acceptable. */
  plainHttp: boolean
  transport: Transport
}

const MAX_TOKEN_RESPONSE_BYTES = 1 << 20
/** Lifetime the distribution token spec assumes when `expires_in` is missing. */
const DEFAULT_TOKEN_SECONDS = 60

interface Token { value: string, expiresAt: number }

export class RegistryAuth {
  private readonly options: RegistryAuthOptions
  private scheme: 'unknown' | 'basic' | 'bearer' = 'unknown'
  private bearer: { realm: URL, service: string | undefined } | undefined
  private readonly tokens = new Map<string, Token>()

  constructor (options: RegistryAuthOptions) {
    this.options = options
  }

  /** The Authorization header for a request that needs SCOPES, or undefined to go anonymous. */
  async header (scopes: readonly string[], signal: AbortSignal): Promise<string | undefined> {
    if (this.scheme === 'basic') return basicHeader(this.options.credentials!)
    if (this.scheme !== 'bearer') return undefined
    const key = scopeKey(scopes)
    let token = this.tokens.get(key)
    if (token === undefined || token.expiresAt <= Date.now()) {
      token = await this.fetchToken(scopes, signal)
      this.tokens.set(key, token)
    }
    return `Bearer ${token.value}`
  }

  /**
   * After a 401 on a request that needed SCOPES: learns what the registry wants
   * and forgets the token that was refused, so the next `header` call brings
   * fresh authorization. Throws when there is nothing left to try.
   */
  async challenged (res: Response, scopes: readonly string[], signal: AbortSignal): Promise<void> {
    await discard(res)
    const challenges = parseChallenges(res.headers.get('www-authenticate') ?? '')
    const bearer = challenges.find(c => c.scheme === 'bearer' && c.params.realm !== undefined)
    if (bearer !== undefined) {
      this.scheme = 'bearer'
      this.bearer = { realm: this.realmUrl(bearer.params.realm!), service: bearer.params.service }
      const key = scopeKey(scopes)
      this.tokens.delete(key)
      // The registry may ask for more than we thought (scope="..." in the challenge): ask for both.
      const wanted = [...new Set([...scopes, ...(bearer.params.scope?.split(' ') ?? [])])]
      this.tokens.set(key, await this.fetchToken(wanted, signal))
      return
    }
    if (challenges.some(c => c.scheme === 'basic')) {
      if (this.options.credentials === undefined) throw this.needsCredentials()
      this.scheme = 'basic'
      return
    }
    throw new OriginError(`${this.options.name} answered 401 without a challenge shoal understands (WWW-Authenticate: ${res.headers.get('www-authenticate') ?? 'missing'})`, { status: 401, retryable: false })
  }

  /** The error for a 401 that fresh authorization did not cure. */
  rejected (): OriginError {
    if (this.options.credentials === undefined) return this.needsCredentials()
    return new OriginError(`${this.options.name} refused the credentials of user "${this.options.credentials.username}" (from ${this.options.credentialSource ?? 'the caller'}): check the user name and password, and that the user may access this repository`, { status: 401, retryable: false })
  }

  private needsCredentials (): OriginError {
    return new OriginError(`${this.options.name} requires credentials: log in (docker login / podman login ${this.options.name.replace(/^docker:\/\//, '')}), or pass USER:PASSWORD (shoal convert --src-creds/--dest-creds, shoal agent --registry-creds)`, { status: 401, retryable: false })
  }

  /** Credentials are sent to the realm only over HTTPS, unless the user chose plain HTTP for this registry. */
  private realmUrl (realm: string): URL {
    let url: URL
    try { url = new URL(realm) } catch {
      throw new OriginError(`${this.options.name}: the token realm "${realm}" in its challenge is not a URL`, { status: 401, retryable: false })
    }
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && this.options.plainHttp)) {
      throw new OriginError(`${this.options.name}: the token realm ${url.href} is not HTTPS; shoal sends credentials to it only with --plain-http`, { status: 401, retryable: false })
    }
    return url
  }

  private async fetchToken (scopes: readonly string[], signal: AbortSignal): Promise<Token> {
    const { realm, service } = this.bearer!
    const url = new URL(realm)
    if (service !== undefined) url.searchParams.set('service', service)
    for (const scope of scopes) url.searchParams.append('scope', scope)
    const credentials = this.options.credentials
    const res = await this.options.transport.send(url, {
      method: 'GET',
      headers: { ...REQUEST_HEADERS, Accept: 'application/json', ...(credentials !== undefined ? { Authorization: basicHeader(credentials) } : {}) },
      signal
    })
    if (res.status === 401 || res.status === 403) {
      await discard(res)
      throw this.rejected()
    }
    if (res.status !== 200) {
      await discard(res)
      throw new OriginError(`${this.options.name}: the token service ${url.origin}${url.pathname} answered ${res.status} ${res.statusText}`.trimEnd(), { status: res.status, retryable: isRetryableStatus(res.status) })
    }
    const body = await readBody(res, { max: MAX_TOKEN_RESPONSE_BYTES }, 'token', url.origin + url.pathname)
    let parsed: { token?: unknown, access_token?: unknown, expires_in?: unknown }
    try { parsed = JSON.parse(Buffer.from(body).toString('utf8')) as typeof parsed } catch {
      throw new OriginError(`${this.options.name}: the token service sent something other than JSON`, { status: 200, retryable: false })
    }
    const value = typeof parsed.token === 'string' && parsed.token !== '' ? parsed.token : parsed.access_token
    if (typeof value !== 'string' || value === '') throw new OriginError(`${this.options.name}: the token service sent no token`, { status: 200, retryable: false })
    const seconds = typeof parsed.expires_in === 'number' && parsed.expires_in > 0 ? parsed.expires_in : DEFAULT_TOKEN_SECONDS
    // Renew a little early, so a token does not expire between being picked and being checked.
    return { value, expiresAt: Date.now() + seconds * 1000 - Math.min(10_000, seconds * 500) }
  }
}

function basicHeader (c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`
}

const scopeKey = (scopes: readonly string[]): string => [...scopes].sort().join(' ')

export const pullScope = (repository: string): string => `repository:${repository}:pull`
export const pushScope = (repository: string): string => `repository:${repository}:pull,push`
