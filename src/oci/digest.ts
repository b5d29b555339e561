import { createHash } from 'node:crypto'
import { FormatError } from '../errors.ts'

/** An OCI content digest, always `sha256:` followed by 64 lowercase hex digits. */
export type Digest = `sha256:${string}`

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/

export function isDigest (value: unknown): value is Digest {
  return typeof value === 'string' && DIGEST_RE.test(value)
}

/** Parses untrusted input; a digest that is not sha256 or malformed is refused. */
export function parseDigest (value: unknown, what = 'digest'): Digest {
  if (!isDigest(value)) {
    throw new FormatError(`${what} ${JSON.stringify(value)} is not a sha256 digest (expected "sha256:" and 64 lowercase hex digits)`)
  }
  return value
}

export function sha256 (data: Uint8Array): Digest {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

export function digestHex (digest: Digest): string {
  return digest.slice(7)
}

export function digestFromHex (hex: Buffer | Uint8Array): Digest {
  return `sha256:${Buffer.from(hex.buffer, hex.byteOffset, hex.byteLength).toString('hex')}`
}

export function digestToBytes (digest: Digest): Buffer {
  return Buffer.from(digest.slice(7), 'hex')
}
