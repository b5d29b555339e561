import type { Digest } from '../oci/digest.ts'
import type { Descriptor } from '../oci/types.ts'
import type { RegistryAccess } from '../registry/client.ts'
import { DirOrigin } from './dir-origin.ts'
import { HttpOrigin, type HttpOriginOptions } from './http-origin.ts'
import type { Origin, OriginRequestOptions } from './origin.ts'

/**
 * An origin from its configured text: an http(s) URL of a served layout, a
 * registry repository `docker://HOST/REPO` (reached as `registry` says), or a
 * layout directory.
 */
export async function openOrigin (location: string, options: HttpOriginOptions & { registry?: RegistryAccess } = {}): Promise<Origin> {
  const { registry, ...http } = options
  if (/^https?:\/\//.test(location)) return new HttpOrigin(location, http)
  // The registry client (node:https, TLS, credentials) loads only for registry origins.
  if (location.startsWith('docker://')) return await (await import('./registry-origin.ts')).RegistryOrigin.open(location, registry, http)
  return await DirOrigin.open(location)
}

/**
 * Several origins serving the same images (mirrors): each call tries them in order
 * and returns the first answer. Content is checked by digest downstream, so a mirror
 * cannot substitute bytes; it can only be unavailable.
 */
export class FailoverOrigin implements Origin {
  readonly name: string
  private readonly origins: readonly Origin[]

  constructor (origins: readonly Origin[]) {
    if (origins.length === 0) throw new RangeError('FailoverOrigin needs at least one origin')
    this.origins = origins
    this.name = origins.map(o => o.name).join(', ')
  }

  async resolve (ref: string, options?: OriginRequestOptions): Promise<Descriptor> {
    return await this.first(o => o.resolve(ref, options), options)
  }

  async getBlob (blob: Digest, options?: OriginRequestOptions & { maxBytes?: number }): Promise<Uint8Array> {
    return await this.first(o => o.getBlob(blob, options), options)
  }

  async getRange (blob: Digest, offset: number, length: number, options?: OriginRequestOptions): Promise<Uint8Array> {
    return await this.first(o => o.getRange(blob, offset, length, options), options)
  }

  private async first<T> (call: (o: Origin) => Promise<T>, options?: OriginRequestOptions): Promise<T> {
    let lastError: unknown
    for (const origin of this.origins) {
      options?.signal?.throwIfAborted()
      try { return await call(origin) } catch (err) { lastError = err }
    }
    throw lastError
  }
}
