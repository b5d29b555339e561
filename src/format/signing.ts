import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto'
import { readFile, writeFile, mkdir, access } from 'node:fs/promises'
import { join } from 'node:path'
import { SignatureError, UsageError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'
import { DEFAULT_CLOCK_SKEW_MS } from './signing-defaults.ts'

/**
 * Image signatures: ed25519 over a DSSE envelope (https://github.com/secure-systems-lab/dsse)
 * whose payload names the manifest digest and, since payload v2, the image names
 * (`REPO:TAG`, or a bare `TAG` for a layout) the signer vouches for, a version that
 * only goes up per name, and an expiry (the CernVM-FS/TUF answer to rollback and
 * substitution). The envelope is an OCI artifact whose subject is the signed
 * manifest, tagged `sha256-<hex>.sig` beside it, the convention cosign users know.
 */
export const SIGNATURE_PAYLOAD_TYPE = 'application/vnd.shoal.manifest-digest.v2+json'
/** The v1 payload (manifest digest only): refused, with a message saying how to re-sign. */
export const SIGNATURE_PAYLOAD_TYPE_V1 = 'application/vnd.shoal.manifest-digest.v1+json'

export interface SignaturePayload {
  manifest: Digest
  mediaType: string
  size: number
  /** `REPO:TAG` (repository without the registry host) or a bare `TAG` (an image in a layout). */
  names: string[]
  /** Monotonic per name: agents refuse a lower one for a name they have seen. */
  version: number
  /** ISO 8601. */
  signedAt: string
  /** ISO 8601, or null for a signature that never expires (only when asked for explicitly). */
  expires: string | null
}

/** What a verified signature says, besides the manifest. */
export interface SignatureInfo {
  /** Key id that signed. */
  signedBy: string
  names: string[]
  version: number
  signedAt: string
  expires: string | null
}

export interface DsseEnvelope {
  payloadType: string
  payload: string // base64
  signatures: Array<{ keyid: string, sig: string }>
}

export function signatureTag (manifest: Digest): string {
  return `sha256-${manifest.slice(7)}.sig`
}

/** DSSE pre-authentication encoding: binds the payload type to the payload. */
function pae (payloadType: string, payload: Buffer): Buffer {
  const type = Buffer.from(payloadType)
  return Buffer.concat([Buffer.from(`DSSEv1 ${type.length} `), type, Buffer.from(` ${payload.length} `), payload])
}

/** A short, stable id for a public key: sha256 of its DER encoding. */
export function keyId (publicKey: KeyObject): string {
  return createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('hex').slice(0, 32)
}

export async function generateKeys (dir: string): Promise<{ privatePath: string, publicPath: string, keyid: string }> {
  await mkdir(dir, { recursive: true })
  const privatePath = join(dir, 'shoal.key')
  const publicPath = join(dir, 'shoal.pub')
  for (const p of [privatePath, publicPath]) {
    if (await access(p).then(() => true, () => false)) throw new UsageError(`${p} already exists; remove it first or choose another --out directory (shoal never overwrites a key)`)
  }
  const { privateKey, publicKey } = generateKeyPairSync('ed25519')
  await writeFile(privatePath, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' })
  await writeFile(publicPath, publicKey.export({ type: 'spki', format: 'pem' }), { mode: 0o644, flag: 'wx' })
  return { privatePath, publicPath, keyid: keyId(publicKey) }
}

export async function loadPrivateKey (path: string): Promise<KeyObject> {
  let pem: string
  try { pem = await readFile(path, 'utf8') } catch { throw new UsageError(`cannot read signing key ${path}; create one with: shoal keygen --out DIR`) }
  let key: KeyObject
  try { key = createPrivateKey(pem) } catch { throw new UsageError(`${path} is not a PEM private key; create one with: shoal keygen --out DIR`) }
  if (key.asymmetricKeyType !== 'ed25519') throw new UsageError(`${path} is a ${key.asymmetricKeyType} key; shoal signs with ed25519 (shoal keygen)`)
  return key
}

export async function loadPublicKey (path: string): Promise<KeyObject> {
  let pem: string
  try { pem = await readFile(path, 'utf8') } catch { throw new UsageError(`cannot read trusted key ${path}`) }
  let key: KeyObject
  try { key = createPublicKey(pem) } catch { throw new UsageError(`${path} is not a PEM public key (expected the shoal.pub written by shoal keygen)`) }
  if (key.asymmetricKeyType !== 'ed25519') throw new UsageError(`${path} is a ${key.asymmetricKeyType} key; shoal trusts ed25519 keys only`)
  return key
}

export function signManifest (payload: SignaturePayload, privateKey: KeyObject): DsseEnvelope {
  const p = checkPayload(payload, payload.manifest)
  // A fixed key order: the same statement always signs the same bytes.
  const body = Buffer.from(JSON.stringify({ manifest: p.manifest, mediaType: p.mediaType, size: p.size, names: p.names, version: p.version, signedAt: p.signedAt, expires: p.expires }))
  const sig = sign(null, pae(SIGNATURE_PAYLOAD_TYPE, body), privateKey)
  return {
    payloadType: SIGNATURE_PAYLOAD_TYPE,
    payload: body.toString('base64'),
    signatures: [{ keyid: keyId(createPublicKey(privateKey)), sig: sig.toString('base64') }]
  }
}

export interface VerifyEnvelopeOptions {
  /** Milliseconds since the epoch; default Date.now(). */
  now?: number
  /** Default DEFAULT_CLOCK_SKEW_MS. */
  clockSkewMs?: number
  /** What the image is called where it was asked for (see nameMatches); refused unless signed for it. */
  expectName?: string
  /** The image as the user wrote it, for the re-sign hint in messages. */
  image?: string
}

/**
 * Accepts the envelope only if one of its signatures verifies under a trusted key,
 * its payload (v2) names exactly this manifest, it has not expired and, when
 * `expectName` is given, it was signed for that name. Returns what it says.
 */
export function verifyEnvelope (envelope: DsseEnvelope, manifest: Digest, trusted: KeyObject[], options: VerifyEnvelopeOptions = {}): SignatureInfo {
  if (trusted.length === 0) throw new SignatureError('no trusted keys configured: pass --trust PUBKEY (the shoal.pub of the key that signed the image)')
  const image = options.image ?? 'IMAGE'
  if (envelope?.payloadType === SIGNATURE_PAYLOAD_TYPE_V1) {
    throw new SignatureError(`image ${manifest} carries a v1 signature (manifest digest only: no name, version or expiry), which shoal no longer accepts because it cannot detect a rollback or a re-pointed tag; re-sign it, without converting again: shoal sign ${image} --key KEY [--name REPO:TAG]`)
  }
  if (envelope?.payloadType !== SIGNATURE_PAYLOAD_TYPE || typeof envelope.payload !== 'string' || !Array.isArray(envelope.signatures)) {
    throw new SignatureError(`signature of ${manifest} is not a shoal DSSE envelope`)
  }
  const body = Buffer.from(envelope.payload, 'base64')
  const message = pae(envelope.payloadType, body)
  let signedBy: string | undefined
  for (const s of envelope.signatures) {
    for (const key of trusted) {
      if (typeof s.sig === 'string' && verify(null, message, key, Buffer.from(s.sig, 'base64'))) { signedBy = keyId(key); break }
    }
    if (signedBy !== undefined) break
  }
  if (signedBy === undefined) {
    const ids = envelope.signatures.map(s => s.keyid).join(', ')
    throw new SignatureError(`image ${manifest} is not signed by a trusted key (signed by key id ${ids}; trusted: ${trusted.map(keyId).join(', ')})`)
  }
  let raw: unknown
  try { raw = JSON.parse(body.toString('utf8')) } catch { throw new SignatureError(`signature payload of ${manifest} is not JSON`) }
  const payload = checkPayload(raw as SignaturePayload, manifest)
  if (payload.manifest !== manifest) throw new SignatureError(`signature is for ${String(payload.manifest)}, not for ${manifest}: the image was re-tagged or tampered with`)
  const now = options.now ?? Date.now()
  if (payload.expires !== null && Date.parse(payload.expires) + (options.clockSkewMs ?? DEFAULT_CLOCK_SKEW_MS) < now) {
    throw new SignatureError(`the signature of image ${manifest} (${payload.names.join(', ')}, version ${payload.version}) expired on ${payload.expires}; an expired signature is refused because it may be a stale or replayed one. If the image is still current, renew it without converting again: shoal sign ${image} --key KEY --expires 90d`)
  }
  if (options.expectName !== undefined && !nameMatches(payload.names, options.expectName)) {
    throw new SignatureError(`image ${manifest} is signed for ${payload.names.join(', ')}, not for ${options.expectName}: a tag was pointed at another image. If that is intended, sign it for this name too: shoal sign ${image} --key KEY --name ${options.expectName.replace(/@.*$/, ':TAG')} (with its other names)`)
  }
  return { signedBy, names: payload.names, version: payload.version, signedAt: payload.signedAt, expires: payload.expires }
}

/** Refuses a payload that is not a well-formed v2 statement. */
function checkPayload (p: SignaturePayload, manifest: string): SignaturePayload {
  const bad = (what: string): never => { throw new SignatureError(`signature payload of ${manifest}: ${what}`) }
  if (p === null || typeof p !== 'object') bad('not an object')
  if (typeof p.manifest !== 'string' || typeof p.mediaType !== 'string' || !Number.isSafeInteger(p.size)) bad('manifest, mediaType or size missing')
  if (!Array.isArray(p.names) || p.names.length === 0 || !p.names.every(n => typeof n === 'string' && n !== '')) bad('names must be a non-empty list of image names')
  if (!Number.isSafeInteger(p.version) || p.version < 0) bad('version must be a non-negative integer')
  if (typeof p.signedAt !== 'string' || Number.isNaN(Date.parse(p.signedAt))) bad('signedAt must be a date')
  if (p.expires !== null && (typeof p.expires !== 'string' || Number.isNaN(Date.parse(p.expires)))) bad('expires must be a date or null')
  return p
}

/**
 * The name an image is signed and checked under: `REPO:TAG`, the repository without
 * its registry host (the same image is often pulled through a mirror host), Docker
 * Hub's one-word names under `library/`; a bare `TAG` for an image in a layout.
 */
export function imageName (repository: string | undefined, tag: string, registry?: string): string {
  if (repository === undefined) return tag
  const hub = registry === undefined || registry === 'docker.io' || registry === 'index.docker.io' || registry === 'registry-1.docker.io'
  return `${hub && !repository.includes('/') ? `library/${repository}` : repository}:${tag}`
}

/**
 * Whether EXPECTED is among NAMES. `REPO@sha256:…` (an image asked for by digest,
 * which pins the manifest itself) needs only a name in the same repository.
 */
export function nameMatches (names: readonly string[], expected: string): boolean {
  const at = expected.indexOf('@')
  if (at < 0) return names.includes(expected)
  const repo = expected.slice(0, at)
  return names.some(n => n.slice(0, Math.max(0, n.lastIndexOf(':'))) === repo)
}

/** `90d`, `12h`, `30m`, `3600s`, `2w` in milliseconds; `never` is null. */
export function parseLifetime (text: string, flag = '--expires'): number | null {
  if (text.trim() === 'never') return null
  const m = /^(\d+)([smhdw])$/.exec(text.trim())
  if (m === null || Number(m[1]) <= 0) throw new UsageError(`${flag} ${text}: write a duration such as 90d, 12h, 2w or 3600s, or "never" for a signature that never expires`)
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 }[m[2] as 's' | 'm' | 'h' | 'd' | 'w']
}
