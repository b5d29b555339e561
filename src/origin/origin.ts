import type { Digest } from '../oci/digest.ts'
import type { Descriptor } from '../oci/types.ts'

export interface OriginRequestOptions {
  signal?: AbortSignal
}

/**
 * Where the immutable blobs of shoal images come from: a local OCI layout
 * directory, a static HTTP server serving such a directory, or (later) an OCI
 * registry. Implementations check lengths; callers check digests.
 */
export interface Origin {
  /** For logs and errors, e.g. `http://127.0.0.1:8080` or `/srv/images`. */
  readonly name: string
  /** Resolves a tag of the origin's index (or a `sha256:` digest) to a manifest descriptor. */
  resolve (ref: string, options?: OriginRequestOptions): Promise<Descriptor>
  /** A whole blob (manifest, config, catalog). `maxBytes` guards against absurd sizes. */
  getBlob (blob: Digest, options?: OriginRequestOptions & { maxBytes?: number }): Promise<Uint8Array>
  /** Exactly `length` bytes of a blob starting at `offset`, or an OriginError. */
  getRange (blob: Digest, offset: number, length: number, options?: OriginRequestOptions): Promise<Uint8Array>
}
