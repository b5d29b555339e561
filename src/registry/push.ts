import { createReadStream } from 'node:fs'
import { Readable } from 'node:stream'
import { FormatError, UsageError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'
import { parseShoalConfig } from '../format/image-config.ts'
import { signatureTag } from '../format/signing.ts'
import { conversionTag } from '../oci/conversion-tags.ts'
import { Semaphore } from '../util/limit.ts'
import type { OciLayout } from '../oci/layout.ts'
import { parseReference } from '../oci/reference.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'
import { openRegistryClient, type PushOutcome, type RegistryAccess, type RegistryClient } from './client.ts'

/**
 * Publishes a signed shoal image from an OCI layout to a registry: every blob
 * the image and its signature list (config, catalogs, packs, the DSSE envelope),
 * then the manifests, last of all the tag. So a tag never points at an image
 * whose blobs or signature are still on their way:
 *
 *   1. blobs, a few at a time: skipped when the repository has them (HEAD),
 *      mounted when another repository named in `mountFrom` has them, else uploaded;
 *   2. the image manifest by its digest (untagged);
 *   3. the signature manifest, tagged sha256-<hex>.sig;
 *   4. the image manifest again, under the tag, and under `sha256-<source manifest
 *      hex>.shoal`: how agents serving containerd find the conversion of an image
 *      (src/oci/conversion-tags.ts), whether it came from convert or from a trace.
 */

export interface PushOptions {
  /** Credentials, CA and plain-HTTP choice for the destination registry. */
  access?: RegistryAccess
  /** Other repositories on the same registry to mount blobs from (cross-repository mount). */
  mountFrom?: readonly string[]
  signal?: AbortSignal
}

export interface PushReport {
  dest: string
  manifestDigest: Digest
  /** Blobs by what happened to them. */
  blobs: Record<PushOutcome, number>
  /** Bytes of the blobs that were uploaded. */
  uploadedBytes: number
}

/** Blobs pushed at once: enough to hide round trips, few enough to share a link fairly. */
const BLOB_CONCURRENCY = 4

/** Pushes the shoal image tagged TAG in LAYOUT to DEST, `docker://HOST/REPO[:TAG]` (default tag `latest`). */
export async function pushToRegistry (layout: OciLayout, tag: string, dest: string, options: PushOptions = {}): Promise<PushReport> {
  const ref = parseReference(dest)
  if (ref.transport !== 'docker') throw new UsageError(`push destination ${dest} must be docker://HOST/REPO:TAG`)
  if (ref.digest !== undefined) throw new UsageError(`push destination ${dest}: name a tag, not a digest (the digest is the image's own)`)
  const client = await openRegistryClient(ref.registry, ref.repository, options.access)
  try {
    return await pushImage(layout, tag, client, ref.repository, ref.tag ?? 'latest', options)
  } finally {
    client.close()
  }
}

async function pushImage (layout: OciLayout, tag: string, client: RegistryClient, repository: string, destTag: string, options: PushOptions = {}): Promise<PushReport> {
  const signal = options.signal
  const imageDesc = await layout.resolveTag(tag)
  const imageBytes = await layout.readBlob(imageDesc.digest, 'manifest')
  const image = parseManifest(imageBytes, `manifest ${imageDesc.digest}`)
  if (image.artifactType !== MediaType.shoalImage) {
    throw new UsageError(`${layout.dir}:${tag} is not a shoal image (artifactType ${image.artifactType ?? 'none'}); convert it first (shoal convert), or copy plain images with skopeo copy`)
  }
  const sigDesc = (await layout.tags()).get(signatureTag(imageDesc.digest))
  if (sigDesc === undefined) throw new UsageError(`${layout.dir}:${tag} has no signature (${signatureTag(imageDesc.digest)}); agents refuse unsigned images, so it is not pushed`)
  const sigBytes = await layout.readBlob(sigDesc.digest, 'signature manifest')
  const sig = parseManifest(sigBytes, `signature manifest ${sigDesc.digest}`)

  const blobs = new Map<Digest, Descriptor>()
  for (const d of [image.config, ...image.layers, sig.config, ...sig.layers]) {
    // Checked before anything is sent: a missing or short file must not look like a network failure later.
    const size = await layout.blobSize(d.digest)
    if (size !== d.size) throw new FormatError(`${layout.blobPath(d.digest)} is ${size} bytes, but the manifest says ${d.size}; the layout is damaged`)
    blobs.set(d.digest, d)
  }
  const counts: Record<PushOutcome, number> = { present: 0, mounted: 0, uploaded: 0 }
  let uploadedBytes = 0
  // The first failure stops the other uploads instead of letting them run on unobserved.
  const failed = new AbortController()
  const pushSignal = signal === undefined ? failed.signal : AbortSignal.any([signal, failed.signal])
  const slots = new Semaphore(BLOB_CONCURRENCY)
  await Promise.all([...blobs.values()].map(desc => slots.run(async () => {
    const outcome = await client.pushBlob(repository, desc, { open: (start, end) => openRange(layout, desc.digest, start, end) }, {
      signal: pushSignal,
      ...(options.mountFrom !== undefined ? { mountFrom: options.mountFrom } : {})
    })
    counts[outcome]++
    if (outcome === 'uploaded') uploadedBytes += desc.size
  }, pushSignal).catch((err: unknown) => {
    failed.abort(err)
    throw err
  })))

  const so = signal !== undefined ? { signal } : {}
  await client.putManifest(repository, imageDesc.digest, imageBytes, imageDesc.mediaType, so)
  await client.putManifest(repository, signatureTag(imageDesc.digest), sigBytes, sigDesc.mediaType, so)
  const source = parseShoalConfig(await layout.readBlob(image.config.digest, 'config'), `config ${image.config.digest}`).source.manifestDigest
  for (const t of [destTag, conversionTag(source)]) await client.putManifest(repository, t, imageBytes, imageDesc.mediaType, so)
  return { dest: `${client.nameOf(repository)}:${destTag}`, manifestDigest: imageDesc.digest, blobs: counts, uploadedBytes }
}

function openRange (layout: OciLayout, digest: Digest, start: number, end: number): Readable {
  if (end <= start) return Readable.from([])
  return createReadStream(layout.blobPath(digest), { start, end: end - 1 })
}

function parseManifest (bytes: Uint8Array, what: string): ImageManifest {
  let manifest: ImageManifest
  try { manifest = JSON.parse(Buffer.from(bytes).toString('utf8')) as ImageManifest } catch (err) {
    throw new FormatError(`${what} is not valid JSON`, { cause: err })
  }
  if (manifest?.config === undefined || !Array.isArray(manifest.layers)) throw new FormatError(`${what} is not an image manifest`)
  return manifest
}
