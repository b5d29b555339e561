import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdir, readdir, readFile, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, it } from 'node:test'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { digestHex, sha256 } from '../../src/oci/digest.ts'
import { contentBytes, type SyntheticEntry } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { testChunks, testResolver, TestSource } from '../fetch/helpers.ts'
import { until } from '../origin/helpers.ts'
import { convertSynthetic, openReadStack } from '../fs/helpers.ts'

/** These tests are about chunk files: no segments (disk-cache-segments.test.ts has those). */
const FILES = { segmentChunkLimit: 0 }

/** Every chunk file under DIR/chunks, by hex name, with its bytes. */
async function chunkFiles (dir: string): Promise<Map<string, Buffer>> {
  const files = new Map<string, Buffer>()
  for (const prefix of await readdir(join(dir, 'chunks'))) {
    for (const name of await readdir(join(dir, 'chunks', prefix))) files.set(name, await readFile(join(dir, 'chunks', prefix, name)))
  }
  return files
}

describe('DiskCache', () => {
  it('stores chunks by digest and finds them again after a restart', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(3)
    const cache = await DiskCache.open({ dir, maxBytes: 1 << 20, ...FILES })
    await Promise.all(chunks.map(c => cache.put(c.ref.digest, c.data)))
    await cache.put(chunks[0]!.ref.digest, chunks[0]!.data) // stored once
    await cache.close()
    const hex = digestHex(chunks[0]!.ref.digest)
    assert.deepEqual(await readFile(join(dir, 'chunks', hex.slice(0, 2), hex)), chunks[0]!.data)

    const reopened = await DiskCache.open({ dir, maxBytes: 1 << 20, ...FILES })
    assert.equal(reopened.stats.chunks, 3)
    assert.equal(reopened.stats.bytes, 3 * 4096)
    assert.deepEqual(await reopened.get(chunks[1]!.ref, { signal: new AbortController().signal }), chunks[1]!.data)
    assert.equal(await reopened.get(testChunks(4)[3]!.ref, { signal: new AbortController().signal }), undefined)
  })

  it('never holds a torn chunk after a writer is killed with SIGKILL', async () => {
    const dir = join(await tempDir(), 'cache')
    const child = spawn(process.execPath, [fileURLToPath(new URL('./crash-writer.ts', import.meta.url)), dir], { stdio: ['ignore', 'pipe', 'inherit'] })
    await new Promise<void>((resolve, reject) => {
      let written = 0
      child.stdout.on('data', (data: Buffer) => {
        written += data.toString().split('\n').length - 1
        // Kill it in the middle of its eight parallel writes.
        if (written >= 40) { child.kill('SIGKILL'); resolve() }
      })
      child.once('exit', code => reject(new Error(`crash writer exited by itself (${code})`)))
    })
    await new Promise(resolve => child.once('exit', resolve))

    const cache = await DiskCache.open({ dir, maxBytes: 1 << 30, ...FILES })
    assert.deepEqual(await readdir(join(dir, 'tmp')), [], 'leftover temp files are removed')
    const files = await chunkFiles(dir)
    assert.ok(files.size >= 40)
    for (const [hex, data] of files) assert.equal(digestHex(sha256(data)), hex, `${hex} holds exactly its chunk`)
    assert.equal(cache.stats.chunks, files.size)
  })

  it('does not serve damaged files: the resolver detects, deletes and refetches them', async () => {
    const dir = join(await tempDir(), 'cache')
    const [torn, wrong, good] = testChunks(3)
    const place = async (hex: string, data: Uint8Array): Promise<void> => {
      await mkdir(join(dir, 'chunks', hex.slice(0, 2)), { recursive: true })
      await writeFile(join(dir, 'chunks', hex.slice(0, 2), hex), data)
    }
    // What a crash (or a disk) could leave behind: a half-written chunk under its
    // final name, another chunk's bytes, a temp file, and a stray file.
    await place(digestHex(torn!.ref.digest), torn!.data.subarray(0, 1000))
    await place(digestHex(wrong!.ref.digest), good!.data)
    await mkdir(join(dir, 'tmp'), { recursive: true })
    await mkdir(join(dir, 'chunks', '00'), { recursive: true })
    await writeFile(join(dir, 'tmp', `${digestHex(good!.ref.digest)}.123abc`), good!.data.subarray(0, 10))
    await writeFile(join(dir, 'chunks', '00', 'not-a-chunk'), 'junk')

    const disk = await DiskCache.open({ dir, maxBytes: 1 << 20, ...FILES })
    assert.equal(disk.stats.staleTempFiles, 1)
    assert.deepEqual(await readdir(join(dir, 'tmp')), [])
    assert.deepEqual(await readdir(join(dir, 'chunks', '00')), [])

    const origin = new TestSource('origin', [torn!, wrong!])
    const { resolver } = await testResolver({ remote: [origin], disk })
    const signal = new AbortController().signal
    assert.deepEqual(await resolver.get(torn!.ref, { signal }), torn!.data)
    assert.deepEqual(await resolver.get(wrong!.ref, { signal }), wrong!.data)
    assert.equal(resolver.stats.verificationFailures.disk, 2)
    assert.equal(disk.stats.removedBad, 2)
    await disk.close()
    const files = await chunkFiles(dir)
    assert.deepEqual(files.get(digestHex(torn!.ref.digest)), torn!.data, 'replaced by the good copy')
    assert.deepEqual(files.get(digestHex(wrong!.ref.digest)), wrong!.data)
  })

  it('evicts least recently used chunks to its low watermark, without failing concurrent readers', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(40, 16 * 1024)
    const maxBytes = 10 * 16 * 1024
    const disk = await DiskCache.open({ dir, maxBytes, ...FILES })
    const origin = new TestSource('origin', chunks)
    // No memory cache: every read goes to the disk cache, racing the evictions.
    const { resolver } = await testResolver({ remote: [origin], disk })
    const signal = new AbortController().signal
    for (let round = 0; round < 5; round++) {
      const order = Array.from({ length: 200 }, (_, i) => chunks[(i * 7 + round * 13) % chunks.length]!)
      const results = await Promise.all(order.map(c => resolver.get(c.ref, { signal })))
      for (const [i, data] of results.entries()) assert.deepEqual(data, order[i]!.data)
      // Each chunk fetched from the origin is written once; let the writes land,
      // so that the next round reads files that evictions are deleting.
      await until(() => disk.stats.writes === origin.calls)
    }
    assert.ok(disk.stats.evictions > 0)
    assert.ok(resolver.stats.sources.disk!.chunks > 0, 'the disk cache did serve reads')
    assert.equal(resolver.stats.unavailable, 0)
    await disk.close()
    assert.ok(disk.stats.bytes <= maxBytes, `${disk.stats.bytes} bytes stored, limit ${maxBytes}`)
    const files = await chunkFiles(dir)
    assert.equal(files.size, disk.stats.chunks, 'the index matches the directory')
    assert.equal([...files.values()].reduce((n, f) => n + f.length, 0), disk.stats.bytes)
  })

  it('turns a chunk deleted between index lookup and read into a miss', async () => {
    const dir = join(await tempDir(), 'cache')
    const [c] = testChunks(1)
    const disk = await DiskCache.open({ dir, maxBytes: 1 << 20, ...FILES })
    await disk.put(c!.ref.digest, c!.data)
    const hex = digestHex(c!.ref.digest)
    await unlink(join(dir, 'chunks', hex.slice(0, 2), hex)) // what an eviction racing the read does
    assert.equal(await disk.get(c!.ref, { signal: new AbortController().signal }), undefined)
    assert.equal(disk.has(c!.ref.digest), false)
    assert.deepEqual(disk.stats, { ...disk.stats, bytes: 0, chunks: 0 })
  })

  it('evicts down to the limit at open when the limit shrank', async () => {
    const dir = join(await tempDir(), 'cache')
    const chunks = testChunks(10, 1000)
    const cache = await DiskCache.open({ dir, maxBytes: 1 << 20, ...FILES })
    for (const c of chunks) await cache.put(c.ref.digest, c.data)
    await cache.close()
    const smaller = await DiskCache.open({ dir, maxBytes: 5000, lowWatermark: 0.5, ...FILES })
    await smaller.close()
    assert.equal(smaller.stats.chunks, 2)
    assert.equal((await chunkFiles(dir)).size, 2)
  })

  it('stores a chunk common to two images once, fetched from the first image\'s origin only', async () => {
    const root = await tempDir()
    const content = { size: 2 * 1024 * 1024 + 1, seed: 'shared' }
    const shared: SyntheticEntry = { type: 'file', path: 'lib/shared.so', content }
    const a = await convertSynthetic(join(root, 'a'), [[shared, { type: 'file', path: 'a.txt', content: 'only in a\n' }]])
    const b = await convertSynthetic(join(root, 'b'), [[{ type: 'file', path: 'b.txt', content: 'only in b\n' }, shared]])
    const disk = await DiskCache.open({ dir: join(root, 'cache'), maxBytes: 1 << 30, ...FILES })
    const stackA = await openReadStack(join(root, 'a'), a, { disk })
    const stackB = await openReadStack(join(root, 'b'), b, { disk })
    try {
      const signal = new AbortController().signal
      const read = async (stack: typeof stackA): Promise<Buffer> => {
        const extents = stack.view.extents(stack.view.resolve('/lib/shared.so')!)
        return Buffer.concat(await Promise.all(extents.map(e => stack.resolver.get(e, { signal }))))
      }
      const expected = contentBytes(content)
      assert.deepEqual(await read(stackA), expected)
      assert.deepEqual(await read(stackB), expected)
      assert.equal(stackA.resolver.stats.sources.origin!.chunks, 3)
      assert.equal(stackB.resolver.stats.sources.origin!.chunks, 0)
      assert.equal(stackB.resolver.stats.sources.disk!.chunks, 3)
      await disk.close()
      assert.equal(disk.stats.chunks, 3)
    } finally {
      stackA.close()
      stackB.close()
    }
  })
})
