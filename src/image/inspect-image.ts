import type { KeyObject } from 'node:crypto'
import { Catalog } from '../format/catalog.ts'
import type { Digest } from '../format/digest.ts'
import type { ShoalImageConfig } from '../format/image-config.ts'
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
  source: ShoalImageConfig['source']
  platform: string
  runtime: ShoalImageConfig['runtime']
  chunking: ShoalImageConfig['chunking']
  compression: ShoalImageConfig['compression']
  layers: LayerSummary[]
  totals: { files: number, contentBytes: number, uniqueChunks: number, uniqueChunkBytes: number, storedBytes: number }
}

/** Summarizes an image: layers, files, chunks, sizes and dedup within and across layers. */
export async function inspectImage (origin: Origin, ref: string, options: { trusted: KeyObject[] | 'skip', workDir: string, signal?: AbortSignal }): Promise<ImageSummary> {
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const image = await loadImage(origin, ref, { trusted: options.trusted, ...so })
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
    source: image.config.source,
    platform: `${image.config.os}/${image.config.architecture}`,
    runtime: image.config.runtime,
    chunking: image.config.chunking,
    compression: image.config.compression,
    layers,
    totals: { files, contentBytes, uniqueChunks: seenChunks.size, uniqueChunkBytes, storedBytes: [...seenPacks.values()].reduce((a, b) => a + b, 0) }
  }
}
