import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { MemoryCache } from '../../src/cache/memory-cache.ts'
import { sha256 } from '../../src/oci/digest.ts'

const chunk = (n: number, size = 100): { digest: ReturnType<typeof sha256>, data: Uint8Array } => {
  const data = new Uint8Array(size).fill(n)
  return { digest: sha256(data), data }
}

describe('MemoryCache', () => {
  it('stays within its byte budget, evicting the least recently used', () => {
    const cache = new MemoryCache(300)
    const [a, b, c, d] = [chunk(1), chunk(2), chunk(3), chunk(4)]
    cache.set(a.digest, a.data)
    cache.set(b.digest, b.data)
    cache.set(c.digest, c.data)
    assert.equal(cache.get(a.digest), a.data) // a is now the most recent
    assert.equal(cache.has(b.digest), true) // has() does not count as a use
    cache.set(d.digest, d.data)
    assert.equal(cache.has(b.digest), false)
    assert.deepEqual([a, c, d].map(x => cache.has(x.digest)), [true, true, true])
    assert.deepEqual(cache.stats, { bytes: 300, chunks: 3, evictions: 1 })
  })

  it('ignores chunks larger than the whole budget, and replaces a chunk stored twice', () => {
    const cache = new MemoryCache(150)
    const big = chunk(9, 200)
    cache.set(big.digest, big.data)
    assert.equal(cache.has(big.digest), false)
    const a = chunk(1)
    cache.set(a.digest, a.data)
    cache.set(a.digest, a.data)
    assert.deepEqual(cache.stats, { bytes: 100, chunks: 1, evictions: 0 })
  })
})
