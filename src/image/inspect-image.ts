import type { KeyObject } from 'node:crypto'
import { Catalog } from '../format/catalog.ts'
import type { Digest } from '../oci/digest.ts'
import type { ShoalImageConfig } from '../format/image-config.ts'
import { SIGNATURE_PAYLOAD_TYPE, signatureTag, type DsseEnvelope, type SignaturePayload } from '../format/signing.ts'
import type { ImageManifest } from '../oci/types.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchCatalogFile } from './catalog-files.ts'
import { loadImage } from './load-image.ts'

export interface LayerSummary {
  diffId: Digest
  catalog: Digest
  files: number
  /** Sum of regular file sizes. */
  contentBytes: number
  /** Distinct chunks this layer's files use, and their uncompressed bytes. */
  chunks: number
  chunkBytes: number
  /** Content bytes saved by identical chunks inside this layer. */
  dedupInLayerBytes: number
  /** Chunks (and bytes) this layer shares with layers below it. */
  sharedWithLowerChunks: number
  sharedWithLowerBytes: number
  packs: number
  packBytes: number
}

export interface ImageSummary {
  manifestDigest: Digest
  signature: string
  /** Names, version, signedAt, expires: checked when --trust was given, else as the envelope says, unchecked. */
  signed?: { names: string[], version: number, signedAt: string, expires: string | null, verified: boolean }
  source: ShoalImageConfig['source']
  platform: string
  runtime: ShoalImageConfig['runtime']
  chunking: ShoalImageConfig['chunking']
  compression: ShoalImageConfig['compression']
  layers: LayerSummary[]
  totals: { files: number, contentBytes: number, uniqueChunks: number, uniqueChunkBytes: number, storedBytes: number }
}

/** Summarizes an image: layers, files, chunks, sizes and dedup within and across layers. */
export async function inspectImage (origin: Origin, ref: string, options: { trusted: KeyObject[] | 'skip', workDir: string, signal?: AbortSignal, image?: string }): Promise<ImageSummary> {
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const image = await loadImage(origin, ref, { trusted: options.trusted, ...so, ...(options.image !== undefined ? { image: options.image } : {}) })
  const signed = image.signature !== undefined ? { names: image.signature.names, version: image.signature.version, signedAt: image.signature.signedAt, expires: image.signature.expires, verified: true } : await unverifiedSignature(origin, image.manifestDigest, so)
  const seenChunks = new Set<string>()
  const seenPacks = new Map<Digest, number>()
  const layers: LayerSummary[] = []
  let files = 0
  let contentBytes = 0
  let uniqueChunkBytes = 0
  for (const layer of image.config.layers) {
    const catalog = new Catalog(await fetchCatalogFile(origin, layer.catalog, options.workDir, options.signal))
    try {
      const row = catalog.db.prepare(`SELECT count(*) AS files, coalesce(sum(size), 0) AS bytes FROM inodes WHERE (mode & ${0o170000}) = ${0o100000}`).get() as { files: number, bytes: number }
      let chunks = 0
      let chunkBytes = 0
      let sharedChunks = 0
      let sharedBytes = 0
      const used = catalog.db.prepare('SELECT c.digest, c.length FROM chunks c WHERE c.id IN (SELECT chunk FROM extents)').iterate() as IterableIterator<{ digest: Buffer, length: number }>
      for (const c of used) {
        chunks++
        chunkBytes += c.length
        const key = c.digest.toString('hex')
        if (seenChunks.has(key)) { sharedChunks++; sharedBytes += c.length } else { seenChunks.add(key); uniqueChunkBytes += c.length }
      }
      for (const p of layer.packs) seenPacks.set(p.digest, p.size)
      layers.push({
        diffId: layer.diffId,
        catalog: layer.catalog.digest,
        files: row.files,
        contentBytes: row.bytes,
        chunks,
        chunkBytes,
        dedupInLayerBytes: row.bytes - chunkBytes,
        sharedWithLowerChunks: sharedChunks,
        sharedWithLowerBytes: sharedBytes,
        packs: layer.packs.length,
        packBytes: layer.packs.reduce((n, p) => n + p.size, 0)
      })
      files += row.files
      contentBytes += row.bytes
    } finally {
      catalog.close()
    }
  }
  return {
    manifestDigest: image.manifestDigest,
    signature: image.signedBy !== undefined ? `verified, key id ${image.signedBy}` : 'not checked (pass --trust PUBKEY)',
    ...(signed !== undefined ? { signed } : {}),
    source: image.config.source,
    platform: `${image.config.os}/${image.config.architecture}`,
    runtime: image.config.runtime,
    chunking: image.config.chunking,
    compression: image.config.compression,
    layers,
    totals: { files, contentBytes, uniqueChunks: seenChunks.size, uniqueChunkBytes, storedBytes: [...seenPacks.values()].reduce((a, b) => a + b, 0) }
  }
}

/** What the envelope says without checking it (inspect without --trust); undefined for none, v1 or unreadable. */
async function unverifiedSignature (origin: Origin, manifest: Digest, so: { signal?: AbortSignal }): Promise<ImageSummary['signed']> {
  try {
    const sigDesc = await origin.resolve(signatureTag(manifest), so)
    const sig = JSON.parse(Buffer.from(await origin.getBlob(sigDesc.digest, { maxBytes: 1 << 20, ...so })).toString('utf8')) as ImageManifest
    const envelope = JSON.parse(Buffer.from(await origin.getBlob(sig.layers[0]!.digest, { maxBytes: 1 << 20, ...so })).toString('utf8')) as DsseEnvelope
    if (envelope.payloadType !== SIGNATURE_PAYLOAD_TYPE) return undefined
    const p = JSON.parse(Buffer.from(envelope.payload, 'base64').toString('utf8')) as SignaturePayload
    return { names: p.names, version: p.version, signedAt: p.signedAt, expires: p.expires, verified: false }
  } catch {
    return undefined
  }
}
