import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { ChunkIndex, wholeBlobChunk } from '../../src/agent/chunk-index.ts'
import { CatalogWriter } from '../../src/convert/catalog-writer.ts'
import { Catalog, S_IFREG, type ChunkRef } from '../../src/format/catalog.ts'
import { Codec } from '../../src/format/codec.ts'
import { digestHex, sha256, type Digest } from '../../src/oci/digest.ts'
import { tempDir } from '../helpers/tmp.ts'

/** A pack of COUNT random chunks of SIZE bytes (only their references: the index never reads chunk bytes). */
function pack (count: number, size = 100): { digest: Digest, chunks: ChunkRef[] } {
  const digest = sha256(randomBytes(32))
  const chunks = Array.from({ length: count }, (_, i) => ({ digest: sha256(randomBytes(32)), length: size, pack: digest, packOffset: i * size, storedLength: size, codec: i % 2 === 0 ? Codec.none : Codec.zstd }))
  return { digest, chunks }
}

/** Writes a catalog naming CHUNKS (one file each) into DIR as <hex>.sqlite, as fetchCatalogFile leaves it; returns its digest. */
async function writeCatalog (dir: string, chunks: ChunkRef[]): Promise<{ digest: Digest, path: string, size: number }> {
  await mkdir(dir, { recursive: true })
  const building = join(dir, `building-${randomBytes(4).toString('hex')}`)
  const writer = new CatalogWriter(`${building}.db`, {})
  const packs = new Map<string, { digest: Digest, size: number }>()
  for (const [i, c] of chunks.entries()) {
    const ino = writer.add(`f${i}`, { mode: S_IFREG | 0o644, uid: 0, gid: 0, mtime: 0, size: c.length })!
    writer.addExtent(ino, 0, { digest: c.digest, length: c.length, packKey: c.pack, packOffset: c.packOffset, storedLength: c.storedLength, codec: c.codec })
    packs.set(c.pack, { digest: c.pack, size: 1 << 20 })
  }
  writer.finish(packs, building)
  const digest = sha256(await readFile(building))
  const path = join(dir, `${digestHex(digest)}.sqlite`)
  await rename(building, path)
  return { digest, path, size: (await stat(path)).size }
}

describe('ChunkIndex', () => {
  it('locates every chunk of the catalogs in its dir, and the catalogs as whole blobs', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const a = pack(5)
    const b = pack(3)
    const first = await writeCatalog(dir, [...a.chunks, ...b.chunks.slice(0, 1)])
    const second = await writeCatalog(dir, b.chunks)
    const index = new ChunkIndex({ catalogDir: dir })
    await index.scan()
    for (const c of [...a.chunks, ...b.chunks]) assert.deepEqual(index.locate(c.digest), c)
    assert.equal(index.locate(sha256(Buffer.from('nobody'))), undefined)
    assert.deepEqual(index.locate(first.digest), wholeBlobChunk(first))
    assert.deepEqual(index.locate(second.digest), { digest: second.digest, length: second.size, pack: second.digest, packOffset: 0, storedLength: second.size, codec: Codec.none })
    assert.deepEqual(index.stats, { catalogs: 2, chunks: 8, wholeBlobs: 2 })
    // A second scan finds nothing new.
    await index.scan()
    assert.deepEqual(index.stats, { catalogs: 2, chunks: 8, wholeBlobs: 2 })
    await index.close()
  })

  it('lists a pack\'s chunks once each, in pack order, when two catalogs name the same pack', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const p = pack(6)
    await writeCatalog(dir, [p.chunks[4]!, p.chunks[1]!, p.chunks[0]!])
    await writeCatalog(dir, [p.chunks[5]!, p.chunks[1]!, p.chunks[2]!])
    const index = new ChunkIndex({ catalogDir: dir })
    await index.scan()
    assert.deepEqual(index.packChunks(p.digest).map(c => c.packOffset), [0, 1, 2, 4, 5].map(i => i * 100))
    assert.deepEqual(index.packChunks(sha256(Buffer.from('unknown pack'))), [])
    await index.close()
  })

  it('names whole blobs (image metadata) as packs of one chunk', async () => {
    const index = new ChunkIndex({ catalogDir: join(await tempDir(), 'none') })
    const blob = { digest: sha256(Buffer.from('{"manifest":1}')), size: 14 }
    assert.equal(index.locate(blob.digest), undefined)
    index.addWholeBlob(blob)
    assert.deepEqual(index.locate(blob.digest), wholeBlobChunk(blob))
    assert.deepEqual(index.packChunks(blob.digest), [wholeBlobChunk(blob)])
    await index.close()
  })

  it('indexes an open catalog (a mount\'s) without opening its file again, once', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const p = pack(4)
    const written = await writeCatalog(dir, p.chunks)
    const index = new ChunkIndex({ catalogDir: dir })
    const catalog = new Catalog(written.path)
    try {
      // Two at once (two mounts sharing a layer): one reads, the other waits for it.
      await Promise.all([index.addCatalog(written.digest, catalog, written.size), index.addCatalog(written.digest, catalog, written.size)])
      await index.addCatalog(written.digest, catalog, written.size)
    } finally {
      catalog.close()
    }
    assert.equal(index.locate(p.chunks[3]!.digest)?.packOffset, 300)
    assert.equal(index.packChunks(p.digest).length, 4)
    // The scan sees it is indexed already (and the closed catalog is not touched).
    await index.scan()
    assert.deepEqual(index.stats, { catalogs: 1, chunks: 4, wholeBlobs: 1 })
    await index.close()
  })

  it('reads a big catalog a few thousand rows per turn of the event loop, and a waiting lookup is answered as its chunk is read', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const p = pack(10_000, 10)
    const written = await writeCatalog(dir, p.chunks)
    const index = new ChunkIndex({ catalogDir: dir })
    const last = index.locateSoon(p.chunks[9_999]!.digest, AbortSignal.timeout(30_000))
    const catalog = new Catalog(written.path)
    try {
      const indexing = index.addCatalog(written.digest, catalog, written.size)
      const first = index.stats.chunks
      assert.ok(first > 0 && first < 10_000, `the first turn read part of it (${first} chunks)`)
      assert.equal(index.locate(written.digest), undefined, 'the catalog is served whole only once it is read')
      await indexing
    } finally {
      catalog.close()
    }
    assert.equal((await last)?.packOffset, 99_990)
    assert.equal(index.packChunks(p.digest).length, 10_000)
    assert.deepEqual(index.locate(written.digest), wholeBlobChunk(written))
    await index.close()
  })

  it('two catalogs naming one pack, indexed at once (two mounts), list each chunk once and in order', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const p = pack(10_000, 10)
    const [one, two] = [await writeCatalog(dir, p.chunks.slice(0, 7_000)), await writeCatalog(dir, p.chunks.slice(3_000))]
    const index = new ChunkIndex({ catalogDir: dir })
    const catalogs = [new Catalog(one.path), new Catalog(two.path)]
    try {
      await Promise.all([index.addCatalog(one.digest, catalogs[0]!, one.size), index.addCatalog(two.digest, catalogs[1]!, two.size)])
    } finally {
      for (const c of catalogs) c.close()
    }
    const offsets = index.packChunks(p.digest).map(c => c.packOffset)
    assert.equal(offsets.length, 10_000)
    assert.deepEqual(offsets, p.chunks.map(c => c.packOffset))
    await index.close()
  })

  it('skips a catalog file that does not match its name, and removes it', async () => {
    const dir = join(await tempDir(), 'catalogs')
    await mkdir(dir)
    const bad = join(dir, `${'0'.repeat(64)}.sqlite`)
    await writeFile(bad, 'not a catalog')
    const index = new ChunkIndex({ catalogDir: dir })
    await index.scan()
    assert.deepEqual(index.stats, { catalogs: 0, chunks: 0, wholeBlobs: 0 })
    await assert.rejects(stat(bad), { code: 'ENOENT' })
    await index.close()
  })

  it('locateSoon resolves when a catalog being opened names the digest', async () => {
    const dir = join(await tempDir(), 'catalogs')
    const p = pack(3)
    const index = new ChunkIndex({ catalogDir: dir })
    const waiting = index.locateSoon(p.chunks[2]!.digest, AbortSignal.timeout(30_000))
    const blob = { digest: sha256(Buffer.from('config')), size: 6 }
    const blobWaiting = index.locateSoon(blob.digest, AbortSignal.timeout(30_000))
    let settled = false
    void waiting.then(() => { settled = true })
    await new Promise(resolve => setTimeout(resolve, 20))
    assert.equal(settled, false, 'waits while nothing names it')
    await writeCatalog(dir, p.chunks)
    await index.scan()
    assert.deepEqual(await waiting, p.chunks[2])
    index.addWholeBlob(blob)
    assert.deepEqual(await blobWaiting, wholeBlobChunk(blob))
    await index.close()
  })

  it('locateSoon gives up when its signal times out or aborts, and leaves no waiter behind', async () => {
    const index = new ChunkIndex({ catalogDir: join(await tempDir(), 'none') })
    const digest = sha256(Buffer.from('never named'))
    const started = performance.now()
    assert.equal(await index.locateSoon(digest, AbortSignal.timeout(50)), undefined)
    assert.ok(performance.now() - started >= 40, 'waited for the timeout')
    const controller = new AbortController()
    const waiting = index.locateSoon(digest, controller.signal)
    controller.abort()
    assert.equal(await waiting, undefined)
    assert.equal(await index.locateSoon(digest, controller.signal), undefined, 'an aborted signal answers at once')
    assert.equal((index as unknown as { waiters: Map<unknown, unknown> }).waiters.size, 0)
    await index.close()
  })

  it('close wakes whoever waits', async () => {
    const index = new ChunkIndex({ catalogDir: join(await tempDir(), 'none') })
    const waiting = index.locateSoon(sha256(Buffer.from('x')), AbortSignal.timeout(30_000))
    await index.close()
    assert.equal(await waiting, undefined)
  })
})
