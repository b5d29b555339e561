import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto'
import { readFile, writeFile, mkdir, access } from 'node:fs/promises'
import { join } from 'node:path'
import { SignatureError, UsageError } from '../errors.ts'
import type { Digest } from './digest.ts'

/**
 * Image signatures: ed25519 over the manifest digest, wrapped in a DSSE envelope
 * (https://github.com/secure-systems-lab/dsse). The envelope is an OCI artifact
 * whose subject is the signed manifest, tagged `sha256-<hex>.sig` beside it, the
 * convention cosign users know.
 */
export const SIGNATURE_PAYLOAD_TYPE = 'application/vnd.shoal.manifest-digest.v1+json'

export interface SignaturePayload { manifest: Digest, mediaType: string, size: number }

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
  const body = Buffer.from(JSON.stringify(payload))
  const sig = sign(null, pae(SIGNATURE_PAYLOAD_TYPE, body), privateKey)
  return {
    payloadType: SIGNATURE_PAYLOAD_TYPE,
    payload: body.toString('base64'),
    signatures: [{ keyid: keyId(createPublicKey(privateKey)), sig: sig.toString('base64') }]
  }
}

/**
 * Accepts the envelope only if one of its signatures verifies under a trusted key
 * and its payload names exactly this manifest. Returns the key id that signed.
 */
export function verifyEnvelope (envelope: DsseEnvelope, manifest: Digest, trusted: KeyObject[]): string {
  if (trusted.length === 0) throw new SignatureError('no trusted keys configured: pass --trust PUBKEY (the shoal.pub of the key that signed the image)')
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
  let payload: SignaturePayload
  try { payload = JSON.parse(body.toString('utf8')) as SignaturePayload } catch { throw new SignatureError(`signature payload of ${manifest} is not JSON`) }
  if (payload.manifest !== manifest) throw new SignatureError(`signature is for ${String(payload.manifest)}, not for ${manifest}: the image was re-tagged or tampered with`)
  return signedBy
}
