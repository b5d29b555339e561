import type { KeyObject } from 'node:crypto'
import { IntegrityError } from '../errors.ts'
import { Catalog, isReg } from '../format/catalog.ts'
import { decodeChunk } from '../format/codec.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchCatalogFile } from './catalog-files.ts'
import type { SignatureInfo } from '../format/signing.ts'
import { loadImage } from './load-image.ts'

export interface VerifyReport {
  manifestDigest: Digest
  signedBy: string
  /** Names, version, signedAt, expires of the verified signature. */
  signature: SignatureInfo
  catalogs: number
  packs: number
  chunks: number
  files: number
  bytes: number
}

export interface VerifyOptions {
  trusted: KeyObject[]
  /** Where catalogs are written to be opened (a temp dir the caller removes). */
  workDir: string
  signal?: AbortSignal
  /** Refused unless the signature names it (see loadImage). */
  expectName?: string
  /** The image as the user wrote it, for hints. */
  image?: string
  onProgress?: (done: number, total: number) => void
}

/**
 * Checks a shoal image end to end: signature, manifest, config, every catalog, every
 * pack blob as a whole, every chunk inside it (decoded, hashed, length-checked), and
 * that each file's extents tile its size exactly. Throws at the first bad object,
 * naming it.
 */
export async function verifyImage (origin: Origin, ref: string, options: VerifyOptions): Promise<VerifyReport> {
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const image = await loadImage(origin, ref, { trusted: options.trusted, ...so, ...(options.expectName !== undefined ? { expectName: options.expectName } : {}), ...(options.image !== undefined ? { image: options.image } : {}) })
  const packs = new Map<Digest, number>()
  const chunksByPack = new Map<Digest, Map<number, { digest: Digest, length: number, storedLength: number, codec: number }>>()
  let files = 0
  let chunkCount = 0
  for (const [i, layer] of image.config.layers.entries()) {
    const catalog = new Catalog(await fetchCatalogFile(origin, layer.catalog, options.workDir, options.signal))
    try {
      const declared = new Map(layer.packs.map(p => [p.digest, p.size]))
      for (const p of catalog.packs()) {
        if (declared.get(p.digest) !== p.size) throw new IntegrityError(`catalog ${layer.catalog.digest}`, `uses pack ${p.digest} (${p.size} bytes), which layer ${i} of the config does not declare`)
        packs.set(p.digest, p.size)
      }
      for (const c of catalog.allChunks()) {
        let inPack = chunksByPack.get(c.pack)
        if (inPack === undefined) { inPack = new Map(); chunksByPack.set(c.pack, inPack) }
        const known = inPack.get(c.packOffset)
        if (known === undefined) {
          inPack.set(c.packOffset, c)
          chunkCount++
        } else if (known.digest !== c.digest || known.length !== c.length || known.storedLength !== c.storedLength || known.codec !== c.codec) {
          // Two catalogs that disagree about the same bytes: one of them would serve garbage.
          throw new IntegrityError(`catalog ${layer.catalog.digest}`, `describes pack ${c.pack} at offset ${c.packOffset} differently from another layer's catalog`)
        }
      }
      // Extents must tile each regular file exactly: no holes, no overlap, no overrun.
      const inodes = catalog.db.prepare('SELECT ino, mode, size FROM inodes').iterate() as IterableIterator<{ ino: number, mode: number, size: number }>
      for (const inode of inodes) {
        if (!isReg(inode.mode)) continue
        files++
        let expected = 0
        for (const e of catalog.extents(inode.ino)) {
          if (e.fileOffset !== expected) throw new IntegrityError(`catalog ${layer.catalog.digest}`, `inode ${inode.ino} has an extent at ${e.fileOffset}, expected ${expected}`)
          expected += e.length
        }
        if (expected !== inode.size) throw new IntegrityError(`catalog ${layer.catalog.digest}`, `inode ${inode.ino} has ${expected} bytes of extents for a size of ${inode.size}`)
      }
    } finally {
      catalog.close()
    }
  }

  let done = 0
  let bytes = 0
  for (const [pack, size] of packs) {
    options.signal?.throwIfAborted()
    // Packs are bounded (about 16 MiB by default), so one is held whole while checked.
    const data = await origin.getRange(pack, 0, size, so)
    const actual = sha256(data)
    if (actual !== pack) throw new IntegrityError(`pack ${pack}`, `content hashes to ${actual}; the pack is corrupt`)
    for (const [offset, c] of chunksByPack.get(pack) ?? []) {
      if (offset + c.storedLength > data.length) throw new IntegrityError(`chunk ${c.digest} in pack ${pack}`, `stored at ${offset}+${c.storedLength}, past the end of the pack`)
      let plain: Uint8Array
      try {
        plain = decodeChunk(data.subarray(offset, offset + c.storedLength), c.codec, c.length)
      } catch (err) {
        throw new IntegrityError(`chunk ${c.digest} in pack ${pack} at offset ${offset}`, `cannot be decoded: ${(err as Error).message}`)
      }
      if (plain.length !== c.length || sha256(plain) !== c.digest) {
        throw new IntegrityError(`chunk ${c.digest} in pack ${pack} at offset ${offset}`, `does not match its digest or length`)
      }
      bytes += c.length
    }
    options.onProgress?.(++done, packs.size)
  }
  return { manifestDigest: image.manifestDigest, signedBy: image.signedBy!, signature: image.signature!, catalogs: image.config.layers.length, packs: packs.size, chunks: chunkCount, files, bytes }
}
