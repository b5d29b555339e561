import { UsageError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'
import type { Descriptor } from '../oci/types.ts'
import type { Origin, OriginRequestOptions } from './origin.ts'

/**
 * Blobs of images from many registries behind one Origin, each read where its image
 * came from. The snapshotter mounts images named by whatever registry a pod names,
 * while the agent's one resolver reads every chunk through one origin: each lazily
 * mounted image routes its catalogs and packs here. Anything not routed goes to the
 * configured origin, if there is one.
 */
export class RoutedOrigin implements Origin {
  readonly name: string
  private readonly fallback: Origin | undefined
  private readonly routes = new Map<Digest, Origin>()

  constructor (fallback?: Origin) {
    this.fallback = fallback
    this.name = fallback?.name ?? 'the registries of the images the snapshotter mounted'
  }

  /** Blobs with these digests are read from ORIGIN from now on (content is digest-checked, so a later route may replace an earlier one). */
  route (digests: Iterable<Digest>, origin: Origin): void {
    for (const d of digests) this.routes.set(d, origin)
  }

  async resolve (ref: string, options?: OriginRequestOptions): Promise<Descriptor> {
    return await this.origin(undefined, ref).resolve(ref, options)
  }

  async getBlob (blob: Digest, options?: OriginRequestOptions & { maxBytes?: number }): Promise<Uint8Array> {
    return await this.origin(blob, blob).getBlob(blob, options)
  }

  async getRange (blob: Digest, offset: number, length: number, options?: OriginRequestOptions): Promise<Uint8Array> {
    return await this.origin(blob, blob).getRange(blob, offset, length, options)
  }

  private origin (blob: Digest | undefined, what: string): Origin {
    const origin = (blob !== undefined ? this.routes.get(blob) : undefined) ?? this.fallback
    if (origin === undefined) throw new UsageError(`no origin configured for ${what}: pass --origin to the agent (images from containerd name their own registry)`)
    return origin
  }
}
