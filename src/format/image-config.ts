import { FormatError } from '../errors.ts'
import type { RuntimeConfig } from '../oci/types.ts'
import { parseDigest, type Digest } from '../oci/digest.ts'
import type { Compression } from './codec.ts'

/** How file content was cut into chunks. */
export type ChunkingParams =
  | { algorithm: 'fixed', chunkSize: number }
  | { algorithm: 'fastcdc', minSize: number, avgSize: number, maxSize: number }

export interface ShoalLayer {
  /** sha256 of the uncompressed source layer tar (the OCI diffID). */
  diffId: Digest
  /** The source layer blob this was converted from. */
  sourceDigest: Digest
  catalog: { digest: Digest, size: number }
  /** Every pack this layer's catalog points into (some may be shared with other layers or images). */
  packs: Array<{ digest: Digest, size: number }>
  files: number
  /** Sum of the sizes of the regular files in this layer. */
  contentBytes: number
}

/** A prefetch hint: a file and the byte ranges a recorded start-up read. */
export interface PrefetchEntry {
  path: string
  ranges?: Array<[offset: number, length: number]>
}

/** The config blob of a shoal image (media type application/vnd.shoal.config.v1+json). */
export interface ShoalImageConfig {
  schemaVersion: 1
  source: { reference: string, manifestDigest: Digest, configDigest: Digest }
  architecture: string
  os: string
  runtime: RuntimeConfig
  chunking: ChunkingParams
  compression: Compression
  prefetch: PrefetchEntry[]
  /** Bottom layer first, as in OCI. */
  layers: ShoalLayer[]
}

/** Validates the shape of an untrusted (but digest-checked) config. */
export function parseShoalConfig (data: Uint8Array, what = 'shoal config'): ShoalImageConfig {
  let value: ShoalImageConfig
  try { value = JSON.parse(Buffer.from(data).toString('utf8')) as ShoalImageConfig } catch (err) {
    throw new FormatError(`${what} is not valid JSON`, { cause: err })
  }
  if (value?.schemaVersion !== 1) throw new FormatError(`${what}: unsupported schemaVersion ${JSON.stringify(value?.schemaVersion)}; this shoal reads version 1`)
  if (!Array.isArray(value.layers) || value.layers.length === 0) throw new FormatError(`${what} lists no layers`)
  for (const [i, layer] of value.layers.entries()) {
    parseDigest(layer.diffId, `${what} layer ${i} diffId`)
    parseDigest(layer.catalog?.digest, `${what} layer ${i} catalog`)
    if (!Array.isArray(layer.packs)) throw new FormatError(`${what} layer ${i} has no packs list`)
    for (const p of layer.packs) parseDigest(p.digest, `${what} layer ${i} pack`)
  }
  const c = value.chunking
  if (c?.algorithm !== 'fixed' && c?.algorithm !== 'fastcdc') throw new FormatError(`${what}: unknown chunking ${JSON.stringify(c)}`)
  value.prefetch ??= []
  value.runtime ??= {}
  return value
}
