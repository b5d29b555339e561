import type { KeyObject } from 'node:crypto'
import type { Digest } from '../format/digest.ts'
import type { ShoalImageConfig } from '../format/image-config.ts'
import { signManifest, signatureTag } from '../format/signing.ts'
import type { OciLayout } from '../oci/layout.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'

/** Writes config, manifest and signature; tags the image only once it is signed. */
export async function writeSignedImage (dest: OciLayout, tag: string, config: ShoalImageConfig, key: KeyObject): Promise<Descriptor> {
  const configDesc = await dest.writeJsonBlob(config, MediaType.shoalConfig)
  const blobs: Descriptor[] = []
  const seen = new Set<Digest>()
  for (const layer of config.layers) {
    if (!seen.has(layer.catalog.digest)) { seen.add(layer.catalog.digest); blobs.push({ mediaType: MediaType.shoalCatalog, digest: layer.catalog.digest, size: layer.catalog.size }) }
    for (const p of layer.packs) {
      if (!seen.has(p.digest)) { seen.add(p.digest); blobs.push({ mediaType: MediaType.shoalPack, digest: p.digest, size: p.size }) }
    }
  }
  const manifest: ImageManifest = { schemaVersion: 2, mediaType: MediaType.ociManifest, artifactType: MediaType.shoalImage, config: configDesc, layers: blobs }
  const manifestDesc = await dest.writeJsonBlob(manifest, MediaType.ociManifest, { artifactType: MediaType.shoalImage })
  const envelope = await dest.writeJsonBlob(signManifest({ manifest: manifestDesc.digest, mediaType: manifestDesc.mediaType, size: manifestDesc.size }, key), MediaType.dsseEnvelope)
  const emptyConfig = await dest.writeJsonBlob({}, MediaType.ociEmpty)
  const sigManifest: ImageManifest = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    artifactType: MediaType.shoalSignature,
    config: emptyConfig,
    layers: [envelope],
    subject: { mediaType: manifestDesc.mediaType, digest: manifestDesc.digest, size: manifestDesc.size }
  }
  const sigDesc = await dest.writeJsonBlob(sigManifest, MediaType.ociManifest, { artifactType: MediaType.shoalSignature })
  await dest.setTag(signatureTag(manifestDesc.digest), sigDesc)
  await dest.setTag(tag, manifestDesc)
  return manifestDesc
}

