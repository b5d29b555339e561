import assert from 'node:assert/strict'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { IntegrityError } from '../../src/errors.ts'
import { OriginChunkSource } from '../../src/fetch/chunk-source.ts'
import { FileReader } from '../../src/fetch/file-reader.ts'
import { ChunkResolver } from '../../src/fetch/resolver.ts'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { MemoryCache } from '../../src/cache/memory-cache.ts'
import { Codec } from '../../src/format/codec.ts'
import { digestHex } from '../../src/oci/digest.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { RangeReader } from '../../src/origin/range-reader.ts'
import { until } from '../origin/helpers.ts'
import { never, testChunks, testResolver, TestSource } from './helpers.ts'
import { contentBytes } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { convertSynthetic, openReadStack, type ConvertedImage, type ReadStack } from '../fs/helpers.ts'

const MiB = 1024 * 1024
const EIGHT = { size: 8 * MiB + 5, seed: 'eight-chunks' }
const TEXT = 'compressible text\n'.repeat(20_000)

describe('OriginChunkSource and FileReader over a converted image', () => {
  // Converted once for the suite; created here (not in a `before` hook) so that
  // tempDir's cleanup belongs to the suite and runs after its last test.
  const converted: Promise<ConvertedImage> = tempDir().then(dir => convertSynthetic(dir, [[
    { type: 'file', path: 'eight.bin', content: EIGHT },
    { type: 'file', path: 'text.txt', content: TEXT }
  ]]))
  converted.catch(() => {}) // reported by the first test that awaits it

  async function stack (options: { readaheadChunks?: number } = {}): Promise<{ stack: ReadStack, reader: (path: string) => FileReader }> {
    const s = await openReadStack(await tempDir(), await converted)
    const reader = (path: string): FileReader => {
      const node = s.view.resolve(path)!
      return new FileReader(s.resolver, s.view.extents(node), node.inode.size, options)
    }
    return { stack: s, reader }
  }

  it('fetches neighbouring chunks of a pack in one range request', async () => {
    const origin = await DirOrigin.open((await converted).layoutDir)
    const ranges = new RangeReader({ origin })
    const source = new OriginChunkSource(ranges)
    const { stack: s } = await stack()
    try {
      const extents = s.view.extents(s.view.resolve('/eight.bin')!)
      const signal = new AbortController().signal
      const chunks = await Promise.all(extents.slice(0, 4).map(e => source.get(e, { signal })))
      assert.deepEqual(Buffer.concat(chunks), contentBytes(EIGHT).subarray(0, 4 * MiB))
      assert.equal(ranges.stats.requests, 1)
    } finally {
      s.close()
    }
  })

  it('reports a stored chunk that does not decode as an IntegrityError', async () => {
    const dir = await tempDir()
    const corrupt = await convertSynthetic(dir, [[{ type: 'file', path: 'text.txt', content: TEXT }]])
    const s = await openReadStack(dir, corrupt)
    try {
      const [extent] = s.view.extents(s.view.resolve('/text.txt')!)
      assert.equal(extent!.codec, Codec.zstd)
      const pack = await open(join(corrupt.layoutDir, 'blobs', 'sha256', digestHex(extent!.pack)), 'r+')
      await pack.write(Buffer.from([0]), 0, 1, extent!.packOffset) // breaks the zstd frame magic
      await pack.close()
      const source = new OriginChunkSource(new RangeReader({ origin: await DirOrigin.open(corrupt.layoutDir) }))
      await assert.rejects(source.get(extent!, { signal: new AbortController().signal }), IntegrityError)
    } finally {
      s.close()
    }
  })

  it('reads any range, across chunk boundaries and up to the end of the file', async () => {
    const { stack: s, reader } = await stack({ readaheadChunks: 0 })
    try {
      const file = reader('/eight.bin')
      const expected = contentBytes(EIGHT)
      const signal = new AbortController().signal
      for (const [offset, length] of [[MiB - 10, 20], [0, 1], [3 * MiB + 7, 2 * MiB], [8 * MiB, 100], [8 * MiB + 5, 10], [9 * MiB, 10]] as const) {
        const target = Buffer.alloc(length)
        const n = await file.read(target, offset, length, signal)
        assert.equal(n, Math.max(0, Math.min(length, expected.length - offset)), `read at ${offset}`)
        assert.deepEqual(target.subarray(0, n), expected.subarray(offset, offset + n), `bytes at ${offset}`)
      }
      assert.equal(s.resolver.stats.sources.origin!.chunks, 6, 'only the chunks touched were fetched (0, 1, 3, 4, 5, 8)')
    } finally {
      s.close()
    }
  })

  it('reads verified chunks from the disk cache with preads: odd offsets across chunk boundaries give the source bytes', async () => {
    const { stack: s, reader } = await stack({ readaheadChunks: 0 })
    try {
      const expected = contentBytes(EIGHT)
      const signal = new AbortController().signal
      const whole = Buffer.alloc(EIGHT.size)
      assert.equal(await reader('/eight.bin').read(whole, 0, whole.length, signal), EIGHT.size)
      await until(() => s.disk.stats.writes === 9)
      // Odd offsets and lengths: inside a chunk, across one and two boundaries, up to and past the end;
      // small ones take the synchronous pread, larger ones the thread pool.
      const reads: Array<[number, number]> = [[MiB - 1, 2], [MiB - 4095, 8191], [3, 4093], [2 * MiB - 7, MiB + 14], [5 * MiB + 123, 16 * 1024 + 1], [8 * MiB - 3, 100], [4 * MiB + 4097, 128 * 1024]]
      let seed = 7
      for (let i = 0; i < 200; i++) {
        seed = (seed * 1103515245 + 12345) % 2 ** 31
        reads.push([seed % (EIGHT.size + 10), 1 + (seed >> 8) % (i % 2 === 0 ? 16 * 1024 : 3 * MiB)])
      }
      const check = async (file: FileReader, label: string): Promise<void> => {
        for (const [offset, length] of reads) {
          const target = Buffer.alloc(length, 0xee)
          const result = file.read(target, offset, length, signal)
          const n = typeof result === 'number' ? result : await result
          assert.equal(n, Math.max(0, Math.min(length, expected.length - offset)), `${label}: read of ${length} at ${offset}`)
          assert.ok(target.subarray(0, n).equals(expected.subarray(offset, offset + n)), `${label}: bytes of ${length} at ${offset}`)
        }
      }
      const fileOf = (resolver: ChunkResolver): FileReader => {
        const node = s.view.resolve('/eight.bin')!
        return new FileReader(resolver, s.view.extents(node), node.inode.size, { readaheadChunks: 0 })
      }

      // Memory cache off: every read is a pread of a chunk this process wrote (verified), none hashed again.
      const noMemory = new ChunkResolver({ disk: s.disk, memory: new MemoryCache(0), remote: [] })
      await check(fileOf(noMemory), 'verified')
      assert.equal(noMemory.stats.sources.disk!.chunks > reads.length, true)
      assert.equal(s.disk.stats.verifiedOnFirstUse, 0)
      assert.ok(s.disk.stats.openFiles > 0)

      // After a restart nothing on disk is trusted: each chunk is hashed on its first use, then pread.
      const reopened = await DiskCache.open({ dir: s.disk.dir, maxBytes: 1 << 30 })
      try {
        const restarted = new ChunkResolver({ disk: reopened, memory: new MemoryCache(0), remote: [] })
        await check(fileOf(restarted), 'after a restart')
        assert.equal(reopened.stats.verifiedOnFirstUse, 9)
        assert.equal(restarted.stats.verificationFailures.disk, 0)
      } finally {
        await reopened.close()
      }
    } finally {
      s.close()
    }
  })

  it('reads ahead of a sequential reader, in few merged requests', async () => {
    const { stack: s, reader } = await stack()
    try {
      const file = reader('/eight.bin')
      const signal = new AbortController().signal
      const target = Buffer.alloc(128 * 1024)
      const out: Buffer[] = []
      for (let offset = 0; offset < EIGHT.size; offset += target.length) {
        const n = await file.read(target, offset, target.length, signal)
        out.push(Buffer.from(target.subarray(0, n)))
      }
      assert.deepEqual(Buffer.concat(out), contentBytes(EIGHT))
      assert.equal(s.resolver.stats.sources.origin!.chunks, 9)
      // Without readahead, each of the 9 chunks is its own request.
      assert.ok(s.ranges.stats.requests <= 4, `${s.ranges.stats.requests} requests`)
    } finally {
      s.close()
    }
  })

  it('does not read ahead of random reads', async () => {
    const { stack: s, reader } = await stack()
    try {
      const file = reader('/eight.bin')
      const signal = new AbortController().signal
      for (const offset of [7 * MiB, 0, 4 * MiB]) await file.read(Buffer.alloc(4096), offset, 4096, signal)
      // Give a wrongly issued readahead the time to show up before counting.
      await new Promise(resolve => setTimeout(resolve, 100))
      assert.equal(s.resolver.stats.sources.origin!.chunks, 3)
    } finally {
      s.close()
    }
  })

  it('stops reading ahead when its signal aborts (the file was closed)', async () => {
    const chunks = testChunks(9)
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    const origin = new TestSource('origin', chunks, async (chunk, signal) => {
      if (chunk.digest !== chunks[0]!.ref.digest) await Promise.race([gate, never(signal)])
      return origin.table.get(chunk.digest)
    })
    const { resolver } = await testResolver({ remote: [origin], prefetchConcurrency: 1 })
    const extents = chunks.map((c, i) => ({ ...c.ref, fileOffset: i * c.data.length }))
    const closed = new AbortController()
    const file = new FileReader(resolver, extents, 9 * chunks[0]!.data.length, { signal: closed.signal })
    const signal = new AbortController().signal
    for (let i = 0; i < 4; i++) await file.read(Buffer.alloc(1024), i * 1024, 1024, signal)
    assert.equal(origin.calls, 2, 'chunk 0 for the reads, chunk 1 for readahead; the rest queued')
    closed.abort()
    release()
    await until(() => origin.active === 0)
    assert.equal(origin.calls, 2)
    assert.equal(origin.signals[1]!.aborted, true)
  })
})
