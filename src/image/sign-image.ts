import { createPublicKey, type KeyObject } from 'node:crypto'
import { Readable } from 'node:stream'
import { FormatError, NotFoundError, SignatureError, UsageError } from '../errors.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import { parseShoalConfig } from '../format/image-config.ts'
import { imageName, SIGNATURE_PAYLOAD_TYPE_V1, signatureTag, verifyEnvelope, type DsseEnvelope, type SignatureInfo } from '../format/signing.ts'
import { OciLayout } from '../oci/layout.ts'
import { parseReference } from '../oci/reference.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'
import { openRegistryClient, type RegistryAccess, type RegistryClient } from '../registry/client.ts'
import { signatureEnvelope, signatureManifest, writeSignature, type SigningParams } from './write-image.ts'

export interface SignImageOptions {
  /** Default: the names of the current signature if this key made it, else the image's own name and its source's. */
  names?: string[]
  /** Default: the signing time in seconds, and at least one more than the current signature's. */
  version?: number
  /** Milliseconds, null for never; default DEFAULT_SIGNATURE_LIFETIME. */
  lifetimeMs?: number | null
  access?: RegistryAccess
  now?: number
}

export interface SignImageReport {
  image: string
  manifestDigest: Digest
  names: string[]
  version: number
  signedAt: string
  expires: string | null
  /** What the replaced signature said, when this key made it (v2). */
  previous?: SignatureInfo
  /** The replaced signature's format, if there was one: 'v1', 'v2', or 'other' (another key, unreadable). */
  replaced?: 'v1' | 'v2' | 'other'
}

/**
 * `shoal sign`: (re-)signs a shoal image in place, in a layout or a registry, without
 * converting it again. Only the signature changes (envelope, signature manifest and
 * its `sha256-<hex>.sig` tag); the manifest, config, catalogs and packs stay as they
 * are. This renews an expiry, raises the version (to move a name forward again) and
 * migrates v1 signatures to v2.
 */
export async function signImage (image: string, key: KeyObject, options: SignImageOptions = {}): Promise<SignImageReport> {
  const ref = parseReference(image)
  if (ref.transport === 'oci') {
    const layout = await OciLayout.open(ref.dir)
    const desc = await layout.resolveTag(ref.tag)
    const manifest = parseManifest(await layout.readBlob(desc.digest, 'manifest'), image)
    const config = parseShoalConfig(await layout.readBlob(manifest.config.digest, 'config'), `config ${manifest.config.digest}`)
    const sigDesc = (await layout.tags()).get(signatureTag(desc.digest))
    const old = sigDesc === undefined ? undefined : await readOld(async d => await layout.readBlob(d, 'signature'), sigDesc.digest)
    const plan = planSignature(image, desc, key, old, [ref.tag], config.source.reference, options)
    await writeSignature(layout, desc, key, plan.params)
    return plan.report(await envelopeInfo(layout, desc, key))
  }
  if (ref.transport !== 'docker') throw new UsageError(`${image}: name a shoal image as oci:DIR:TAG or docker://HOST/REPO:TAG`)
  const client = await openRegistryClient(ref.registry, ref.repository, options.access)
  try {
    const reference = ref.digest ?? ref.tag ?? 'latest'
    const { descriptor, bytes } = await client.getManifest(ref.repository, reference)
    const desc: Descriptor = { mediaType: descriptor.mediaType, digest: descriptor.digest, size: descriptor.size }
    const manifest = parseManifest(bytes, image)
    const config = parseShoalConfig(await client.getBlob(ref.repository, manifest.config.digest), `config ${manifest.config.digest}`)
    let old: OldSignature | undefined
    try {
      const sig = await client.getManifest(ref.repository, signatureTag(desc.digest))
      old = await readOld(async d => await client.getBlob(ref.repository, d), sig.descriptor.digest, sig.bytes)
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err
    }
    const own = ref.digest === undefined ? [imageName(ref.repository, ref.tag ?? 'latest', ref.registry)] : []
    const plan = planSignature(image, desc, key, old, own, config.source.reference, options)
    const envelope = jsonBlob(signatureEnvelope(desc, key, plan.params), MediaType.dsseEnvelope)
    const empty = jsonBlob({}, MediaType.ociEmpty)
    for (const b of [envelope, empty]) await pushBytes(client, ref.repository, b)
    const sigManifest = Buffer.from(JSON.stringify(signatureManifest(desc, envelope.desc, empty.desc)))
    await client.putManifest(ref.repository, signatureTag(desc.digest), sigManifest, MediaType.ociManifest)
    return plan.report(verifyEnvelope(JSON.parse(envelope.bytes.toString('utf8')) as DsseEnvelope, desc.digest, [createPublicKey(key)], { now: plan.params.now! }))
  } finally {
    client.close()
  }
}

interface OldSignature { envelope: DsseEnvelope | undefined }

/** The current signature's envelope, if it can be read (it is not trusted: see planSignature). */
async function readOld (get: (d: Digest) => Promise<Uint8Array>, sigDigest: Digest, sigBytes?: Uint8Array): Promise<OldSignature> {
  try {
    const sig = JSON.parse(Buffer.from(sigBytes ?? await get(sigDigest)).toString('utf8')) as ImageManifest
    const layer = sig.layers?.[0]
    if (layer === undefined) return { envelope: undefined }
    return { envelope: JSON.parse(Buffer.from(await get(layer.digest)).toString('utf8')) as DsseEnvelope }
  } catch (err) {
    if (err instanceof NotFoundError || err instanceof SyntaxError || err instanceof FormatError) return { envelope: undefined }
    throw err
  }
}

function planSignature (image: string, desc: Descriptor, key: KeyObject, old: OldSignature | undefined, ownNames: string[], sourceReference: string, options: SignImageOptions): { params: SigningParams, report: (info: SignatureInfo) => SignImageReport } {
  const now = options.now ?? Date.now()
  let previous: SignatureInfo | undefined
  let replaced: SignImageReport['replaced']
  if (old !== undefined) {
    replaced = old.envelope?.payloadType === SIGNATURE_PAYLOAD_TYPE_V1 ? 'v1' : 'other'
    // Only a signature this very key made is taken as the default: the signer must not re-vouch for names someone else wrote.
    try {
      if (old.envelope !== undefined) {
        previous = verifyEnvelope(old.envelope, desc.digest, [createPublicKey(key)], { now: 0 })
        replaced = 'v2'
      }
    } catch (err) {
      if (!(err instanceof SignatureError)) throw err
    }
  }
  let names = options.names
  if (names === undefined) {
    names = previous?.names ?? [...ownNames, ...sourceName(sourceReference)]
    names = [...new Set(names)]
  }
  if (names.length === 0) throw new UsageError(`${image}: say which names to sign it for: --name REPO:TAG (repeatable)`)
  const version = options.version ?? Math.max(Math.floor(now / 1000), (previous?.version ?? -1) + 1)
  const params: SigningParams = { names, version, now, ...(options.lifetimeMs !== undefined ? { lifetimeMs: options.lifetimeMs } : {}) }
  return {
    params,
    report: info => ({
      image,
      manifestDigest: desc.digest,
      names: info.names,
      version: info.version,
      signedAt: info.signedAt,
      expires: info.expires,
      ...(previous !== undefined ? { previous } : {}),
      ...(replaced !== undefined ? { replaced } : {})
    })
  }
}

/** The source's REPO:TAG when it came from a registry by tag (the name pods use). */
function sourceName (reference: string): string[] {
  try {
    const s = parseReference(reference)
    if (s.transport === 'docker' && s.tag !== undefined) return [imageName(s.repository, s.tag, s.registry)]
  } catch {}
  return []
}

async function envelopeInfo (layout: OciLayout, desc: Descriptor, key: KeyObject): Promise<SignatureInfo> {
  const sig = JSON.parse(Buffer.from(await layout.readBlob((await layout.resolveTag(signatureTag(desc.digest))).digest, 'signature')).toString('utf8')) as ImageManifest
  const envelope = JSON.parse(Buffer.from(await layout.readBlob(sig.layers[0]!.digest, 'envelope')).toString('utf8')) as DsseEnvelope
  return verifyEnvelope(envelope, desc.digest, [createPublicKey(key)], { now: 0 })
}

function parseManifest (bytes: Uint8Array, image: string): ImageManifest {
  let manifest: ImageManifest
  try { manifest = JSON.parse(Buffer.from(bytes).toString('utf8')) as ImageManifest } catch (err) {
    throw new FormatError(`the manifest of ${image} is not valid JSON`, { cause: err })
  }
  if (manifest?.artifactType !== MediaType.shoalImage) throw new UsageError(`${image} is not a shoal image (artifactType ${manifest?.artifactType ?? 'none'}); convert it first: shoal convert SRC DEST --key KEY`)
  return manifest
}

function jsonBlob (value: unknown, mediaType: string): { bytes: Buffer, desc: Descriptor } {
  const bytes = Buffer.from(JSON.stringify(value))
  return { bytes, desc: { mediaType, digest: sha256(bytes), size: bytes.length } }
}

async function pushBytes (client: RegistryClient, repository: string, blob: { bytes: Buffer, desc: Descriptor }): Promise<void> {
  await client.pushBlob(repository, blob.desc, { open: (start, end) => Readable.from(end > start ? [blob.bytes.subarray(start, end)] : []) })
}
