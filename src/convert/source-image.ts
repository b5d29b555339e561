import { mkdtemp, rm, mkdir } from 'node:fs/promises'
import { createReadStream } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import tarStream from 'tar-stream'
import { FormatError, NotFoundError, UsageError } from '../errors.ts'
import { parseDigest, type Digest } from '../oci/digest.ts'
import { openRegistryClient, type RegistryAccess } from '../registry/client.ts'
import { OciLayout, streamToFile } from '../oci/layout.ts'
import { formatReference, type ImageReference } from '../oci/reference.ts'
import { MediaType, type Descriptor, type ImageConfig, type ImageIndex, type ImageManifest } from '../oci/types.ts'

/** A resolved source image: its manifest and config, and its layer blobs as streams. */
export interface SourceImage {
  reference: string
  manifestDigest: Digest
  manifest: ImageManifest
  configDigest: Digest
  config: ImageConfig
  /** A layer blob's bytes as stored (compressed); the reader checks its digest. */
  openLayer: (layer: Descriptor, signal?: AbortSignal) => Readable
  /** Removes temporary files (an extracted oci-archive), closes connections. */
  close: () => Promise<void>
}

/** Where resolveImage reads manifests and blobs; each checks the digest it was asked for. */
interface ImageStore {
  readManifest: (desc: Descriptor, what: string) => Promise<Uint8Array>
  readBlob: (digest: Digest, what: string) => Promise<Uint8Array>
  openLayer: SourceImage['openLayer']
}

export interface Platform { os: string, architecture: string, variant?: string }

export function hostPlatform (): Platform {
  const arch = ({ x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' } as Record<string, string>)[process.arch] ?? process.arch
  return { os: 'linux', architecture: arch }
}

/**
 * Opens `oci:DIR:TAG`, `oci-archive:FILE[:TAG]` or `docker://HOST/REPO[:TAG|@DIGEST]`
 * as a source image. Registry layers are streamed, not downloaded first.
 */
export async function openSourceImage (ref: ImageReference, options: { platform?: Platform, registry?: RegistryAccess, signal?: AbortSignal } = {}): Promise<SourceImage> {
  const platform = options.platform ?? hostPlatform()
  if (ref.transport === 'oci') {
    const layout = await OciLayout.open(ref.dir)
    return await resolveImage(layoutStore(layout), await layout.resolveTag(ref.tag), formatReference(ref), platform, async () => {})
  }
  if (ref.transport === 'oci-archive') {
    const dir = await mkdtemp(join(tmpdir(), 'shoal-archive-'))
    try {
      await extractLayoutArchive(ref.file, dir)
      const layout = await OciLayout.open(dir)
      let descriptor: Descriptor
      if (ref.tag !== undefined) descriptor = await layout.resolveTag(ref.tag)
      else {
        const { manifests } = await layout.readIndex()
        if (manifests.length !== 1) throw new UsageError(`${ref.file} holds ${manifests.length} images; name one with oci-archive:${ref.file}:TAG`)
        descriptor = manifests[0]!
      }
      return await resolveImage(layoutStore(layout), descriptor, formatReference(ref), platform, async () => { await rm(dir, { recursive: true, force: true }) })
    } catch (err) {
      await rm(dir, { recursive: true, force: true })
      throw err
    }
  }
  return await openRegistryImage(ref, platform, options)
}

/** A registry image: manifests and config fetched (digest-checked), layers streamed on demand. */
async function openRegistryImage (ref: ImageReference & { transport: 'docker' }, platform: Platform, options: { registry?: RegistryAccess, signal?: AbortSignal }): Promise<SourceImage> {
  const client = await openRegistryClient(ref.registry, ref.repository, options.registry)
  try {
    const so = options.signal !== undefined ? { signal: options.signal } : {}
    const top = await client.resolveManifest(ref.repository, ref.digest ?? ref.tag ?? 'latest', so)
    const store: ImageStore = {
      readManifest: async desc => (await client.getManifest(ref.repository, desc.digest, so)).bytes,
      readBlob: async digest => await client.getBlob(ref.repository, digest, so),
      openLayer: (layer, signal) => Readable.from(client.streamBlob(ref.repository, layer, signal !== undefined ? { signal } : {}), { objectMode: false })
    }
    return await resolveImage(store, top, formatReference(ref), platform, async () => { client.close() })
  } catch (err) {
    client.close()
    throw err
  }
}

function layoutStore (layout: OciLayout): ImageStore {
  return {
    readManifest: async (desc, what) => await layout.readBlob(desc.digest, what),
    readBlob: async (digest, what) => await layout.readBlob(digest, what),
    openLayer: layer => layout.openBlobStream(layer.digest)
  }
}

async function resolveImage (store: ImageStore, descriptor: Descriptor, reference: string, platform: Platform, close: () => Promise<void>): Promise<SourceImage> {
  let desc = descriptor
  if (desc.mediaType === MediaType.ociIndex || desc.mediaType === MediaType.dockerManifestList) {
    const index = parseJson<ImageIndex>(await store.readManifest(desc, 'image index'), `image index ${desc.digest}`)
    const match = index.manifests.find(m => m.platform?.os === platform.os && m.platform?.architecture === platform.architecture &&
      (platform.variant === undefined || m.platform?.variant === platform.variant))
    if (match === undefined) {
      const have = index.manifests.map(m => `${m.platform?.os}/${m.platform?.architecture}`).join(', ')
      throw new NotFoundError(`${reference} has no image for ${platform.os}/${platform.architecture} (it has: ${have})`)
    }
    desc = match
  }
  if (desc.mediaType !== MediaType.ociManifest && desc.mediaType !== MediaType.dockerManifest) {
    throw new FormatError(`${reference} is a ${desc.mediaType}, not an image manifest`)
  }
  const manifest = parseJson<ImageManifest>(await store.readManifest(desc, 'manifest'), `manifest ${desc.digest}`)
  if (manifest.artifactType === MediaType.shoalImage) throw new UsageError(`${reference} is already a shoal image`)
  const configDigest = parseDigest(manifest.config?.digest, 'manifest config digest')
  const config = parseJson<ImageConfig>(await store.readBlob(configDigest, 'image config'), `image config ${configDigest}`)
  const diffIds = config.rootfs?.diff_ids
  if (!Array.isArray(diffIds) || diffIds.length !== manifest.layers.length) {
    throw new FormatError(`${reference}: the config lists ${diffIds?.length ?? 0} diff_ids for ${manifest.layers.length} layers`)
  }
  for (const [i, layer] of manifest.layers.entries()) {
    layer.digest = parseDigest(layer.digest, `layer ${i} digest`)
    // The converter holds each layer blob to this size, as to its digest.
    if (!Number.isSafeInteger(layer.size) || layer.size < 0) throw new FormatError(`${reference}: layer ${i} has size ${JSON.stringify(layer.size)}, which is not a byte count`)
    config.rootfs.diff_ids[i] = parseDigest(diffIds[i], `layer ${i} diff_id`)
  }
  return { reference, manifestDigest: desc.digest, manifest, configDigest, config, openLayer: store.openLayer, close }
}

function parseJson<T> (data: Uint8Array, what: string): T {
  try { return JSON.parse(Buffer.from(data).toString('utf8')) as T } catch (err) {
    throw new FormatError(`${what} is not valid JSON`, { cause: err })
  }
}

const LAYOUT_MEMBER = /^(?:\.\/)?(oci-layout|index\.json|blobs\/sha256\/[0-9a-f]{64})$/

/**
 * Unpacks an oci-archive (a tar of an OCI layout). Only layout members are taken;
 * any other name, including ones that try to climb out, is skipped.
 */
async function extractLayoutArchive (file: string, dir: string): Promise<void> {
  await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true })
  const extract = tarStream.extract()
  // Settled either way, so a failure on the reading side cannot leave it unhandled.
  const streamFailed = pipeline(createReadStream(file), extract).then(() => undefined, (err: Error) => err)
  try {
    for await (const entry of extract) {
      const m = LAYOUT_MEMBER.exec(entry.header.name)
      if (entry.header.type === 'file' && m !== null) await streamToFile(entry as AsyncIterable<Uint8Array>, join(dir, m[1]!))
      else entry.resume()
    }
  } catch (err) {
    extract.destroy()
    const first = await streamFailed ?? err as Error
    throw new FormatError(`cannot read oci-archive ${file}: ${first.message} (truncated or not a tar?)`, { cause: first })
  }
  const failure = await streamFailed
  if (failure !== undefined) throw new FormatError(`cannot read oci-archive ${file}: ${failure.message}`, { cause: failure })
}

