import { NotFoundError, OriginError, UsageError } from '../errors.ts'
import { parseDigest, type Digest } from '../oci/digest.ts'
import { parseReference } from '../oci/reference.ts'
import type { Descriptor } from '../oci/types.ts'
import { openRegistryClient, type RegistryAccess, type RegistryClient } from '../registry/client.ts'
import type { RetryOptions, RequestStats } from '../http/http-retry.ts'
import type { Origin, OriginRequestOptions } from './origin.ts'

/**
 * An origin that is one repository of an OCI registry, `docker://HOST/REPO`:
 * shoal images pushed there by `shoal convert ... docker://HOST/REPO:TAG` (or
 * `shoal push`) are mounted by tag or digest, the signature found under its
 * `sha256-<hex>.sig` tag, and chunks read with HTTP Range requests on the pack
 * blobs (following redirects to blob storage, without the registry's
 * credentials). Retries, backoff and concurrency are HttpOrigin's.
 *
 * A registry serves manifests from /manifests/ and everything else from
 * /blobs/, while the Origin interface has one getBlob: digests that resolve()
 * returned are fetched as manifests, others as blobs, falling back to the
 * manifest endpoint when the blob endpoint does not know the digest.
 */
export class RegistryOrigin implements Origin {
  readonly name: string
  readonly stats: RequestStats
  private readonly client: RegistryClient
  private readonly repository: string
  private readonly manifests = new Set<Digest>()

  constructor (client: RegistryClient, repository: string) {
    this.client = client
    this.repository = repository
    this.name = client.nameOf(repository)
    this.stats = client.stats
  }

  /** Opens `docker://HOST/REPO` (no tag: tags are what resolve() is asked for). */
  static async open (location: string, access: RegistryAccess = {}, options: RetryOptions = {}): Promise<RegistryOrigin> {
    const ref = parseReference(location)
    if (ref.transport !== 'docker') throw new UsageError(`registry origin "${location}" must be docker://HOST/REPO`)
    if (ref.tag !== undefined || ref.digest !== undefined) {
      throw new UsageError(`registry origin "${location}" names an image; an origin is a repository (docker://${ref.registry}/${ref.repository}), and the tag goes to shoal mount or shoal run`)
    }
    return new RegistryOrigin(await openRegistryClient(ref.registry, ref.repository, access, options), ref.repository)
  }

  async resolve (ref: string, options: OriginRequestOptions = {}): Promise<Descriptor> {
    const desc = await this.client.resolveManifest(this.repository, ref, options)
    this.manifests.add(desc.digest)
    return desc
  }

  async getBlob (blob: Digest, options: OriginRequestOptions & { maxBytes?: number } = {}): Promise<Uint8Array> {
    const digest = parseDigest(blob, 'blob digest')
    if (this.manifests.has(digest)) return await this.manifest(digest, options)
    try {
      return await this.client.getBlob(this.repository, digest, options)
    } catch (err) {
      if (!(err instanceof OriginError) || err.status !== 404) throw err
      // Not a blob; perhaps a manifest. If not that either, the blob's 404 is the answer.
      return await this.manifest(digest, options).catch((manifestErr: unknown) => {
        throw manifestErr instanceof NotFoundError ? err : manifestErr
      })
    }
  }

  async getRange (blob: Digest, offset: number, length: number, options: OriginRequestOptions = {}): Promise<Uint8Array> {
    return await this.client.getBlobRange(this.repository, parseDigest(blob, 'blob digest'), offset, length, options)
  }

  private async manifest (digest: Digest, options: OriginRequestOptions & { maxBytes?: number }): Promise<Uint8Array> {
    const { bytes } = await this.client.getManifest(this.repository, digest, options)
    if (options.maxBytes !== undefined && bytes.length > options.maxBytes) {
      throw new OriginError(`manifest ${digest} in ${this.name} is ${bytes.length} bytes, more than the ${options.maxBytes} expected`, { retryable: false })
    }
    this.manifests.add(digest)
    return bytes
  }
}
