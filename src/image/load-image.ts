import type { KeyObject } from 'node:crypto'
import { FormatError, IntegrityError, NotFoundError, SignatureError } from '../errors.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import { parseShoalConfig, type ShoalImageConfig } from '../format/image-config.ts'
import { signatureTag, verifyEnvelope, type DsseEnvelope, type SignatureInfo } from '../format/signing.ts'
import type { Origin } from '../origin/origin.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'

export interface LoadedImage {
  manifestDigest: Digest
  manifest: ImageManifest
  config: ShoalImageConfig
  /** Key id that signed the image; undefined when loaded without checking. */
  signedBy: string | undefined
  /** What the verified signature says: names, version, signedAt, expires (undefined when not checked). */
  signature: SignatureInfo | undefined
}

/**
 * Fetches a whole blob of known digest and size, e.g. through the agent's resolver
 * (cache, peers, origin) so that a burst of nodes shares the image's metadata too.
 * What it returns is checked against the digest again by the caller.
 */
export type BlobFetcher = (blob: SharedBlob, signal?: AbortSignal) => Promise<Uint8Array>

export interface SharedBlob {
  digest: Digest
  size: number
  /** What the blob belongs to, as a swarm key for peers: its image's manifest digest, or its layer's catalog digest. */
  group: Digest
}

export interface LoadOptions {
  /** Trusted public keys; `'skip'` loads without checking the signature (inspect only). */
  trusted: KeyObject[] | 'skip'
  signal?: AbortSignal
  /** How digest-addressed metadata (manifest, signature, config) is fetched. Default: straight from the origin. */
  fetchBlob?: BlobFetcher
  /**
   * The name the image was asked for (`REPO:TAG`, a bare `TAG` for a layout, or
   * `REPO@DIGEST`): refused unless the signature names it. Undefined: any name.
   */
  expectName?: string
  /** The image as the user wrote it (oci:DIR:TAG, docker://HOST/REPO:TAG), for the re-sign hints in signature errors; default IMAGE. */
  image?: string
  /** For tests: the time expiry is checked against (ms since the epoch). */
  now?: number
}

/** Small blobs (manifests, configs, envelopes) never need more than this. */
const MAX_METADATA_BYTES = 4 << 20

/** Fetches a blob and refuses it unless it has exactly the expected digest (and size). */
export async function fetchVerified (origin: Origin, digest: Digest, what: string, options: { size?: number, maxBytes?: number, signal?: AbortSignal } = {}): Promise<Uint8Array> {
  const data = await origin.getBlob(digest, { maxBytes: options.maxBytes ?? MAX_METADATA_BYTES, ...(options.signal !== undefined ? { signal: options.signal } : {}) })
  if (options.size !== undefined && data.length !== options.size) throw new IntegrityError(`${what} ${digest}`, `is ${data.length} bytes, expected ${options.size}`)
  const actual = sha256(data)
  if (actual !== digest) throw new IntegrityError(`${what} ${digest}`, `content hashes to ${actual}; it was corrupted or tampered with at ${origin.name}`)
  return data
}

/** A metadata blob through `fetcher` when there is one (checked here all the same), else from the origin. */
async function fetchMetadata (origin: Origin, blob: { digest: Digest, size: number }, what: string, options: { signal?: AbortSignal, fetcher?: BlobFetcher | undefined, group: Digest }): Promise<Uint8Array> {
  if (options.fetcher === undefined || blob.size > MAX_METADATA_BYTES) {
    return await fetchVerified(origin, blob.digest, what, { size: blob.size, ...(options.signal !== undefined ? { signal: options.signal } : {}) })
  }
  const data = await options.fetcher({ digest: blob.digest, size: blob.size, group: options.group }, options.signal)
  if (data.length !== blob.size || sha256(data) !== blob.digest) throw new IntegrityError(`${what} ${blob.digest}`, 'the fetched bytes do not match the digest')
  return data
}

function parseJson<T> (data: Uint8Array, what: string): T {
  try { return JSON.parse(Buffer.from(data).toString('utf8')) as T } catch (err) {
    throw new FormatError(`${what} is not valid JSON`, { cause: err })
  }
}

/**
 * Resolves REF at the origin and walks the chain of trust: signature → manifest
 * digest → config. Catalogs and packs are checked by whoever reads them, against
 * the digests this returns.
 */
export async function loadImage (origin: Origin, ref: string, options: LoadOptions): Promise<LoadedImage> {
  const signal = options.signal
  const so = signal !== undefined ? { signal } : {}
  // Only the tag lookups go to the origin unconditionally: what a tag points to is the origin's word.
  const desc = await origin.resolve(ref, so)
  const fo = { ...so, fetcher: options.fetchBlob, group: desc.digest }
  const manifest = parseJson<ImageManifest>(await fetchMetadata(origin, desc, 'manifest', fo), `manifest ${desc.digest}`)
  if (manifest.artifactType !== MediaType.shoalImage) {
    throw new FormatError(`${ref} at ${origin.name} is not a shoal image (artifactType ${manifest.artifactType ?? 'none'}); convert it first: shoal convert SRC DEST --key KEY`)
  }

  let signature: SignatureInfo | undefined
  if (options.trusted !== 'skip') {
    let sigDesc: Descriptor
    try {
      sigDesc = await origin.resolve(signatureTag(desc.digest), so)
    } catch (err) {
      if (err instanceof NotFoundError) throw new SignatureError(`image ${desc.digest} (${ref}) has no signature at ${origin.name}; unsigned images are refused`)
      throw err
    }
    const sigManifest = parseJson<ImageManifest>(await fetchMetadata(origin, sigDesc, 'signature manifest', fo), 'signature manifest')
    if (sigManifest.subject?.digest !== desc.digest || sigManifest.layers?.length !== 1) {
      throw new SignatureError(`the signature manifest tagged for ${desc.digest} does not sign it`)
    }
    const envelopeDesc = sigManifest.layers[0]!
    const envelope = parseJson<DsseEnvelope>(await fetchMetadata(origin, envelopeDesc, 'signature envelope', fo), 'signature envelope')
    signature = verifyEnvelope(envelope, desc.digest, options.trusted, {
      ...(options.expectName !== undefined ? { expectName: options.expectName } : {}),
      ...(options.now !== undefined ? { now: options.now } : {}),
      image: options.image ?? 'IMAGE'
    })
  }

  const config = parseShoalConfig(await fetchMetadata(origin, manifest.config, 'config', fo), `config ${manifest.config.digest}`)
  // Every blob the config relies on must be listed, with its size, by the signed manifest.
  const listed = new Map(manifest.layers.map(l => [l.digest, l.size]))
  for (const [i, layer] of config.layers.entries()) {
    for (const blob of [layer.catalog, ...layer.packs]) {
      if (listed.get(blob.digest) !== blob.size) throw new IntegrityError(`config ${manifest.config.digest}`, `layer ${i} refers to ${blob.digest} (${blob.size} bytes), which the manifest does not list with that size`)
    }
  }
  return { manifestDigest: desc.digest, manifest, config, signedBy: signature?.signedBy, signature }
}
