import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { appendFile, readdir, readFile, stat, truncate } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, it } from 'node:test'
import { CACHE_MODES, DiskCache } from '../../src/cache/disk-cache.ts'
import { parseSegmentIndex, SEGMENT_RECORD_BYTES } from '../../src/cache/segments.ts'
import { digestHex, sha256, type Digest } from '../../src/oci/digest.ts'
import { tempDir } from '../helpers/tmp.ts'
import { until } from '../origin/helpers.ts'
import { testChunks, testResolver, TestSource } from '../fetch/helpers.ts'
import { cachedChunks, flipBits, read, shoal } from './damage-helpers.ts'

const signal = new AbortController().signal

/**
 * Small chunks live in segments (DiskCache, "Segments"): appended to a data file,
 * named by fixed-size CRC-checked records in an index file. These tests crash a
 * writer, tear and damage both files, run `shoal cache verify` beside a running
 * cache, and evict: no damaged byte is ever served, and what is lost is fetched again.
 */

const segmentsOf = async (dir: string): Promise<string[]> => (await readdir(join(dir, 'segments'))).sort()

describe('disk cache segments (small chunks)', () => {
  it('keeps small chunks in one segment, not a file each, owner-only, and finds them again after a restart (hashed on first use)', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(20, 3000)
    const big = testChunks(1, 100 * 1024)[0]!
    const cache = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    for (const c of [...chunks, big]) await cache.put(c.ref.digest, c.data)
    assert.deepEqual(await segmentsOf(dir), ['00000001.data', '00000001.idx'])
    for (const name of await segmentsOf(dir)) assert.equal((await stat(join(dir, 'segments', name))).mode & 0o777, CACHE_MODES.file)
    assert.equal((await stat(join(dir, 'segments'))).mode & 0o777, CACHE_MODES.dir)
    assert.match(cache.chunkLocation(digestHex(big.ref.digest))!.path, /chunks/) // large chunks stay files
    for (const c of chunks) assert.deepEqual(await cache.get(c.ref, { signal }), c.data)
    await cache.close()

    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    assert.equal(disk.stats.chunks, 21)
    assert.equal(disk.isVerified(chunks[0]!.ref.digest), false)
    const origin = new TestSource('origin', [])
    const { resolver } = await testResolver({ remote: [origin], disk })
    for (const c of chunks) assert.deepEqual(await read(resolver, c, 100, 200), c.data.subarray(100, 300))
    assert.equal(disk.stats.verifiedOnFirstUse, 20)
    assert.equal(origin.calls, 0)
    await disk.close()
  })

  it('after a writer is killed with SIGKILL, every recorded chunk is complete', async () => {
    const dir = join(await tempDir(), 'cache')
    const child = spawn(process.execPath, [fileURLToPath(new URL('./crash-writer.ts', import.meta.url)), dir, '5000'], { stdio: ['ignore', 'pipe', 'inherit'] })
    await new Promise<void>((resolve, reject) => {
      let written = 0
      child.stdout.on('data', (data: Buffer) => {
        written += data.toString().split('\n').length - 1
        if (written >= 200) { child.kill('SIGKILL'); resolve() }
      })
      child.once('exit', code => reject(new Error(`crash writer exited by itself (${code})`)))
    })
    await new Promise(resolve => child.once('exit', resolve))
    const idx = await readFile(join(dir, 'segments', '00000001.idx'))
    const { live } = parseSegmentIndex(idx, (await stat(join(dir, 'segments', '00000001.data'))).size)
    assert.ok(live.size >= 200)
    const cache = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    assert.equal(cache.stats.chunks, live.size)
    for (const r of live.values()) {
      const digest: Digest = `sha256:${r.hex}`
      const data = await cache.get({ digest, length: r.length, pack: digest, packOffset: 0, storedLength: r.length, codec: 0 }, { signal })
      assert.equal(digestHex(sha256(data!)), r.hex, `${r.hex} holds exactly its chunk`)
    }
    await cache.close()
  })

  it('a torn or damaged index record and a truncated data file lose only the chunks they name', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(10, 2000)
    const first = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    for (const c of chunks) await first.put(c.ref.digest, c.data)
    await first.close()
    const idx = join(dir, 'segments', '00000001.idx')
    await flipBits(idx, 3 * SEGMENT_RECORD_BYTES + 10) // record 3 fails its CRC
    await appendFile(idx, Buffer.alloc(20, 0xab)) // a torn record at the end
    await truncate(join(dir, 'segments', '00000001.data'), 10 * 2000 - 1) // chunk 9 is cut short

    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    assert.equal((await stat(idx)).size, 10 * SEGMENT_RECORD_BYTES, 'the torn tail is cut off')
    assert.equal(disk.has(chunks[3]!.ref.digest), false)
    assert.equal(disk.has(chunks[9]!.ref.digest), false)
    assert.equal(disk.stats.chunks, 8)
    const origin = new TestSource('origin', chunks)
    const { resolver } = await testResolver({ remote: [origin], disk })
    for (const c of chunks) assert.deepEqual(await read(resolver, c, 0, 2000), c.data)
    assert.equal(origin.calls, 2) // the two lost chunks, appended again
    await until(() => disk.stats.writes === 2)
    await disk.close()
    const again = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    assert.equal(again.stats.chunks, 10)
    await again.close()
  })

  it('bits flipped in a segment before start are caught on first use, never served, tombstoned and fetched again', async () => {
    const dir = join(await tempDir(), 'cache')
    const [victim, other] = testChunks(2, 30_000) // above the synchronous read size: the async path
    const first = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    for (const c of [victim!, other!]) await first.put(c.ref.digest, c.data)
    const at = first.chunkLocation(digestHex(victim!.ref.digest))!
    await first.close()
    await flipBits(at.path, at.offset + 20_000)

    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    const origin = new TestSource('origin', [victim!, other!])
    const { resolver } = await testResolver({ remote: [origin], disk })
    assert.deepEqual(await read(resolver, victim!, 19_990, 20), victim!.data.subarray(19_990, 20_010))
    assert.deepEqual(await read(resolver, other!, 0, 100), other!.data.subarray(0, 100))
    assert.equal(resolver.stats.verificationFailures.disk, 1)
    assert.equal(disk.stats.removedBad, 1)
    assert.equal(origin.calls, 1)
    await until(() => disk.stats.writes === 1)
    await disk.close()
    // The tombstone keeps the damaged copy out after a restart; the good copy appended since is found.
    const again = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    assert.notDeepEqual(again.chunkLocation(digestHex(victim!.ref.digest)), at)
    assert.deepEqual(await again.get(victim!.ref, { signal }), victim!.data)
    await again.close()
  })

  it('bits flipped while the agent runs: `shoal cache verify` deletes the segment, and the running cache fetches its chunks again', async () => {
    const { state, dir, chunks, victim, disk, resolver } = await cachedChunks(8000)
    const at = disk.chunkLocation(digestHex(victim.ref.digest))!
    await flipBits(at.path, at.offset + 10)

    const verify = await shoal(['cache', 'verify', '--state', state, '--json'])
    assert.equal(verify.code, 1, verify.stderr)
    const result = JSON.parse(verify.stdout) as { checked: number, bad: number, removed: string[] }
    assert.deepEqual({ checked: result.checked, bad: result.bad, removed: result.removed }, { checked: 4, bad: 1, removed: [digestHex(victim.ref.digest)] })
    assert.deepEqual(await segmentsOf(dir), [])

    await until(() => disk.stats.removedOutside === 4)
    assert.equal(disk.has(victim.ref.digest), false)
    assert.deepEqual(await read(resolver, victim, 0, 4096), victim.data.subarray(0, 4096))
    await until(() => disk.stats.writes === chunks.length + 1)
    const again = await shoal(['cache', 'verify', '--state', state])
    assert.equal(again.code, 0, again.stderr)
    await disk.close()
  })

  it('evicts whole segments, least recently used first, without failing readers', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(100, 4000)
    // 256 KB of cache: segments of 16 KB (1/16 of it), four chunks each.
    const disk = await DiskCache.open({ dir, maxBytes: 256_000, lowWatermark: 0.5 })
    const origin = new TestSource('origin', chunks)
    const { resolver } = await testResolver({ remote: [origin], disk })
    for (const c of chunks) assert.deepEqual(await read(resolver, c, 0, 4000), c.data)
    await until(() => disk.stats.writes === chunks.length)
    assert.ok(disk.stats.evictions > 0)
    assert.ok(disk.stats.bytes <= 256_000)
    assert.equal(disk.has(chunks[0]!.ref.digest), false, 'the oldest went first')
    assert.equal(disk.has(chunks[99]!.ref.digest), true)
    const names = await segmentsOf(dir)
    assert.ok(names.length / 2 <= 256_000 / 16_000 + 1, `${names.length / 2} segments left`)
    for (const c of chunks) assert.deepEqual(await read(resolver, c, 100, 50), c.data.subarray(100, 150))
    await disk.close()
  })
})
