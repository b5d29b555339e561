import assert from 'node:assert/strict'
import { truncate } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { digestHex } from '../../src/oci/digest.ts'
import { tempDir } from '../helpers/tmp.ts'
import { until } from '../origin/helpers.ts'
import { testChunks, testResolver, TestSource } from '../fetch/helpers.ts'
import { cachedChunks, flipBits, read, shoal } from './damage-helpers.ts'

const signal = new AbortController().signal

/**
 * The disk cache is trusted once verified (docs/ARCHITECTURE.md, "Trust boundary"):
 * these tests damage chunk files on disk and check that each kind of damage is
 * caught (hash on first use, length checks, `shoal cache verify`), that the bad
 * file is removed, and that readers get the right bytes, fetched again, from then on.
 */

describe('a cache file damaged on disk', () => {
  it('before the agent started (bits flipped, same length; truncated): caught on first use, removed, fetched again', async () => {
    const dir = join(await tempDir(), 'cache')
    const [flipped, truncated, good] = testChunks(3, 64 * 1024)
    const first = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    for (const c of [flipped!, truncated!, good!]) await first.put(c.ref.digest, c.data)
    await first.close()
    await flipBits(first.chunkPath(digestHex(flipped!.ref.digest)), 40_000)
    await truncate(first.chunkPath(digestHex(truncated!.ref.digest)), 1000)

    // A new process: nothing it found on disk is verified yet.
    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    const origin = new TestSource('origin', [flipped!, truncated!, good!])
    const { resolver } = await testResolver({ remote: [origin], disk })
    assert.equal(disk.isVerified(flipped!.ref.digest), false)
    // Small reads, at offsets the damage is not even in: the first use hashes the whole chunk.
    assert.deepEqual(await read(resolver, flipped!, 0, 4096), flipped!.data.subarray(0, 4096))
    assert.deepEqual(await read(resolver, truncated!, 0, 100), truncated!.data.subarray(0, 100))
    assert.deepEqual(await read(resolver, good!, 5, 4096), good!.data.subarray(5, 4101))
    assert.equal(resolver.stats.verificationFailures.disk, 2)
    assert.equal(disk.stats.removedBad, 2)
    assert.equal(origin.calls, 2, 'only the two damaged chunks were fetched again')
    assert.equal(disk.stats.verifiedOnFirstUse, 1, 'the good chunk was hashed once, then trusted')
    // From now on the good copies are served (and the files on disk are good again).
    await until(() => disk.stats.writes === 2)
    for (const c of [flipped!, truncated!, good!]) {
      assert.equal(disk.isVerified(c.ref.digest), true)
      assert.deepEqual(await read(resolver, c, 60_000, 5536), c.data.subarray(60_000))
    }
    assert.equal(origin.calls, 2)
    await disk.close()
    for (const c of [flipped!, truncated!]) {
      const reopened = await DiskCache.open({ dir, maxBytes: 1 << 30 })
      assert.deepEqual(await reopened.get(c.ref, { signal }), c.data)
      await reopened.close()
    }
  })

  it('a small chunk (read and hashed synchronously on first use) with bits flipped is caught the same way', async () => {
    const dir = join(await tempDir(), 'cache')
    const [small, other] = testChunks(2, 4096)
    const first = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    for (const c of [small!, other!]) await first.put(c.ref.digest, c.data)
    // Small chunks live in a segment (disk-cache-segments.test.ts): damage its bytes there.
    const at = first.chunkLocation(digestHex(small!.ref.digest))!
    assert.match(at.path, /segments/)
    await first.close()
    await flipBits(at.path, at.offset + 4000)
    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    const origin = new TestSource('origin', [small!, other!])
    const { resolver } = await testResolver({ remote: [origin], disk })
    // One synchronous read of an untouched chunk: answered without a promise, hashed, then trusted.
    const target = Buffer.alloc(100)
    assert.equal(resolver.read(other!.ref, target, 0, 10, 100, { signal }), undefined)
    assert.deepEqual(target, other!.data.subarray(10, 110))
    assert.equal(disk.stats.verifiedOnFirstUse, 1)
    assert.deepEqual(await read(resolver, small!, 0, 100), small!.data.subarray(0, 100))
    assert.equal(resolver.stats.verificationFailures.disk, 1)
    assert.equal(disk.stats.removedBad, 1)
    assert.equal(origin.calls, 1)
    await disk.close()
  })

  it('truncated while the agent runs: the length checks catch it, open or not, and it is never served', async () => {
    const dir = join(await tempDir(), 'cache')
    const [open_, closed] = testChunks(2, 64 * 1024)
    const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
    const origin = new TestSource('origin', [open_!, closed!])
    const { resolver } = await testResolver({ remote: [origin], disk })
    assert.deepEqual(await read(resolver, open_!, 0, 10), open_!.data.subarray(0, 10))
    assert.deepEqual(await read(resolver, closed!, 0, 10), closed!.data.subarray(0, 10))
    await until(() => disk.stats.writes === 2)
    // open_ gets an open file (a pread), closed_ is verified but its file not open yet.
    assert.deepEqual(await read(resolver, open_!, 100, 10), open_!.data.subarray(100, 110))
    assert.equal(disk.stats.openFiles, 1)
    for (const c of [open_!, closed!]) await truncate(disk.chunkPath(digestHex(c.ref.digest)), 30_000)

    // A read beyond the cut: a short pread; a read of the unopened file: fstat at open.
    assert.deepEqual(await read(resolver, open_!, 40_000, 4096), open_!.data.subarray(40_000, 44_096))
    assert.deepEqual(await read(resolver, closed!, 0, 4096), closed!.data.subarray(0, 4096))
    assert.equal(resolver.stats.verificationFailures.disk, 2)
    assert.equal(disk.stats.removedBad, 2)
    assert.equal(origin.calls, 4)
    await disk.close()
  })

  it('bits flipped while the agent runs: `shoal cache verify` deletes it, and the agent stops serving it', async () => {
    const { state, chunks, victim, disk, origin, resolver } = await cachedChunks(64 * 1024)
    assert.deepEqual(await read(resolver, victim, 0, 4096), victim.data.subarray(0, 4096)) // opens its file
    await flipBits(disk.chunkPath(digestHex(victim.ref.digest)), 10)

    // The agent trusts what it verified, so this damage is found by the full check (exit code 1: bad chunks).
    const verify = await shoal(['cache', 'verify', '--state', state, '--json'])
    assert.equal(verify.code, 1, verify.stderr)
    const result = JSON.parse(verify.stdout) as { checked: number, bad: number, removed: string[] }
    assert.deepEqual({ checked: result.checked, bad: result.bad, removed: result.removed }, { checked: 4, bad: 1, removed: [digestHex(victim.ref.digest)] })

    // The running cache notices that its open file was deleted, and reads the chunk afresh.
    await until(() => disk.stats.removedOutside === 1)
    assert.equal(disk.has(victim.ref.digest), false)
    assert.deepEqual(await read(resolver, victim, 0, 4096), victim.data.subarray(0, 4096))
    assert.equal(origin.calls, chunks.length + 1)
    await until(() => disk.stats.writes === chunks.length + 1)
    const again = await shoal(['cache', 'verify', '--state', state])
    assert.equal(again.code, 0, again.stderr)
    assert.match(again.stdout, /^4 chunks \(0\.3 MiB\) checked, 0 bad$/m)
    await disk.close()
  })
})
