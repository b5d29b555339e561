import type { KeyObject } from 'node:crypto'
import type { Digest } from '../oci/digest.ts'
import type { ShoalImageConfig } from '../format/image-config.ts'
import { imageName, parseLifetime, signManifest, signatureTag, type DsseEnvelope } from '../format/signing.ts'
import { DEFAULT_SIGNATURE_LIFETIME } from '../format/signing-defaults.ts'
import type { OciLayout } from '../oci/layout.ts'
import { parseReference } from '../oci/reference.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'

/** What a signature says besides the manifest (payload v2, src/format/signing.ts). */
export interface SigningParams {
  /** Names the signer vouches for: `REPO:TAG` (no registry host) or a bare `TAG` for a layout. */
  names: string[]
  /** Default: the signing time in seconds since the epoch (monotonic per signer in practice). */
  version?: number
  /** Lifetime in milliseconds, null for never; default DEFAULT_SIGNATURE_LIFETIME. */
  lifetimeMs?: number | null
  /** Default Date.now(). */
  now?: number
}

/** The DSSE envelope for MANIFEST with PARAMS' names, version and expiry. */
export function signatureEnvelope (manifest: Descriptor, key: KeyObject, params: SigningParams): DsseEnvelope {
  const now = params.now ?? Date.now()
  const lifetime = params.lifetimeMs === undefined ? parseLifetime(DEFAULT_SIGNATURE_LIFETIME) : params.lifetimeMs
  return signManifest({
    manifest: manifest.digest,
    mediaType: manifest.mediaType,
    size: manifest.size,
    names: [...new Set(params.names)],
    version: params.version ?? Math.floor(now / 1000),
    signedAt: new Date(now).toISOString(),
    expires: lifetime === null ? null : new Date(now + lifetime).toISOString()
  }, key)
}

/** The signature artifact (a manifest whose subject is the image) around ENVELOPE and CONFIG (the empty config). */
export function signatureManifest (manifest: Descriptor, envelope: Descriptor, emptyConfig: Descriptor): ImageManifest {
  return {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    artifactType: MediaType.shoalSignature,
    config: emptyConfig,
    layers: [envelope],
    subject: { mediaType: manifest.mediaType, digest: manifest.digest, size: manifest.size }
  }
}

/** Writes (or replaces) the signature of MANIFEST in DEST: envelope, signature manifest, `sha256-<hex>.sig` tag. */
export async function writeSignature (dest: OciLayout, manifest: Descriptor, key: KeyObject, params: SigningParams): Promise<Descriptor> {
  const envelope = await dest.writeJsonBlob(signatureEnvelope(manifest, key, params), MediaType.dsseEnvelope)
  const emptyConfig = await dest.writeJsonBlob({}, MediaType.ociEmpty)
  const sigDesc = await dest.writeJsonBlob(signatureManifest(manifest, envelope, emptyConfig), MediaType.ociManifest, { artifactType: MediaType.shoalSignature })
  await dest.setTag(signatureTag(manifest.digest), sigDesc)
  return sigDesc
}

/** Writes config, manifest and signature; tags the image only once it is signed. Default name: TAG. */
export async function writeSignedImage (dest: OciLayout, tag: string, config: ShoalImageConfig, key: KeyObject, signing: SigningParams = { names: [tag] }): Promise<Descriptor> {
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
  await writeSignature(dest, manifestDesc, key, signing)
  await dest.setTag(tag, manifestDesc)
  return manifestDesc
}

/**
 * The names `shoal convert` signs when not told (--name): the destination's
 * `REPO:TAG` (a bare TAG for a layout), and for a docker:// source its `REPO:TAG`
 * too, the name pods use, which agents serving containerd check the conversion against.
 */
export function defaultSignedNames (source: string, dest: string): string[] {
  const names: string[] = []
  const d = parseReference(dest)
  if (d.transport === 'docker') names.push(imageName(d.repository, d.tag ?? 'latest', d.registry))
  else if (d.transport === 'oci') names.push(d.tag)
  const s = parseReference(source)
  if (s.transport === 'docker' && (s.tag !== undefined || s.digest === undefined)) names.push(imageName(s.repository, s.tag ?? 'latest', s.registry))
  return [...new Set(names)]
}
