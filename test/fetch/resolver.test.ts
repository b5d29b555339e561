import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { MemoryCache } from '../../src/cache/memory-cache.ts'
import { IntegrityError } from '../../src/errors.ts'
import { ChunkUnavailableError } from '../../src/fetch/errors.ts'
import type { ResolverEvent } from '../../src/fetch/resolver.ts'
import { OriginError } from '../../src/errors.ts'
import { until } from '../origin/helpers.ts'
import { never, testChunks, testResolver, TestSource } from './helpers.ts'

const signal = new AbortController().signal

describe('ChunkResolver', () => {
  it('serves a chunk from the first source that has it, and caches it on disk', async () => {
    const [c] = testChunks(1)
    const peers = new TestSource('peers')
    const origin = new TestSource('origin', [c!])
    const { resolver, disk } = await testResolver({ remote: [peers, origin] })
    assert.deepEqual(await resolver.get(c!.ref, { signal }), c!.data)
    assert.equal(peers.calls, 1, 'peers were asked first')
    assert.deepEqual(resolver.stats.sources.origin, { chunks: 1, bytes: c!.data.length })
    await until(() => disk.stats.writes === 1)
    assert.deepEqual(await resolver.get(c!.ref, { signal }), c!.data)
    assert.equal(origin.calls, 1, 'the second read came from the disk cache')
    assert.equal(resolver.stats.sources.disk!.chunks, 1)
  })

  it('never returns or caches bytes that fail length or SHA-256 checks, and counts them per source', async () => {
    const [c] = testChunks(1)
    const events: ResolverEvent[] = []
    const liar = new TestSource('peers', [], async () => c!.data.map(b => b ^ 1))
    const short = new TestSource('mirror', [], async () => c!.data.subarray(1))
    const origin = new TestSource('origin', [c!])
    const { resolver, disk } = await testResolver({ remote: [liar, short, origin], onEvent: e => events.push(e) })
    assert.deepEqual(await resolver.get(c!.ref, { signal }), c!.data)
    assert.equal(resolver.stats.verificationFailures.peers, 1)
    assert.equal(resolver.stats.verificationFailures.mirror, 1)
    assert.equal(resolver.stats.verificationFailures.origin, 0)
    assert.deepEqual(events.filter(e => e.type === 'verification-failure').map(e => e.source), ['peers', 'mirror'])
    await until(() => disk.stats.writes === 1)
    assert.equal(disk.stats.chunks, 1, 'only the good copy was cached')
  })

  it('treats a source\'s IntegrityError (bytes that do not decode) as a verification failure', async () => {
    const [c] = testChunks(1)
    const origin = new TestSource('origin', [c!], async (chunk, _s, call) => {
      if (call === 1) throw new IntegrityError(`chunk ${chunk.digest}`, 'stored bytes do not decode')
      return c!.data
    })
    const { resolver } = await testResolver({ remote: [origin] })
    assert.deepEqual(await resolver.get(c!.ref, { signal }), c!.data)
    assert.equal(resolver.stats.verificationFailures.origin, 1)
    assert.equal(origin.calls, 2, 'the origin was retried')
  })

  it('fails with ChunkUnavailableError naming every source when all attempts fail', async () => {
    const [c] = testChunks(1)
    const peers = new TestSource('peers')
    const origin = new TestSource('origin', [], async () => { throw new OriginError('connection refused', { retryable: true }) })
    const { resolver } = await testResolver({ remote: [peers, origin], attempts: 3 })
    await assert.rejects(resolver.get(c!.ref, { signal }), (err: unknown) => {
      assert.ok(err instanceof ChunkUnavailableError)
      assert.equal(err.code, 'ECHUNKUNAVAILABLE')
      assert.deepEqual(err.failures, [{ source: 'origin', reason: 'connection refused' }])
      assert.match(err.message, /could not be fetched from any source \(3 attempts\).*origin: connection refused/)
      return true
    })
    assert.equal(origin.calls, 3)
    assert.equal(resolver.stats.unavailable, 1)
  })

  it('gives up after its timeout on a source that never answers, aborting it', async () => {
    const [c] = testChunks(1)
    const origin = new TestSource('origin', [], async (_chunk, s) => await never(s))
    const { resolver } = await testResolver({ remote: [origin], timeoutMs: 200 })
    await assert.rejects(resolver.get(c!.ref, { signal }), (err: unknown) => err instanceof ChunkUnavailableError && /not resolved within 200 ms/.test(err.message))
    assert.equal(origin.signals[0]!.aborted, true)
  })

  it('shares one fetch between concurrent callers (singleflight)', async () => {
    const [c] = testChunks(1)
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    const origin = new TestSource('origin', [c!], async () => { await gate; return c!.data })
    const { resolver } = await testResolver({ remote: [origin] })
    const reads = Array.from({ length: 50 }, () => resolver.get(c!.ref, { signal }))
    await until(() => origin.calls === 1)
    release()
    for (const data of await Promise.all(reads)) assert.deepEqual(data, c!.data)
    assert.equal(origin.calls, 1)
    assert.equal(resolver.stats.joined, 49)
    assert.equal(resolver.stats.sources.origin!.chunks, 1)
  })

  it('lets one caller abort without killing the fetch the others wait for; aborts it when all leave', async () => {
    const [a, b] = testChunks(2)
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    const origin = new TestSource('origin', [a!, b!], async (chunk, s) => {
      if (chunk.digest === b!.ref.digest) return await never(s)
      await gate
      return a!.data
    })
    const { resolver } = await testResolver({ remote: [origin] })

    const quitter = new AbortController()
    const abandoned = resolver.get(a!.ref, { signal: quitter.signal })
    const patient = resolver.get(a!.ref, { signal })
    await until(() => origin.calls === 1)
    quitter.abort(new Error('caller gave up'))
    await assert.rejects(abandoned, /caller gave up/)
    assert.equal(origin.signals[0]!.aborted, false)
    release()
    assert.deepEqual(await patient, a!.data)

    const both = [new AbortController(), new AbortController()]
    const reads = both.map(c => resolver.get(b!.ref, { signal: c.signal }))
    await until(() => origin.calls === 2)
    for (const c of both) c.abort(new Error('gone'))
    await Promise.allSettled(reads)
    assert.equal(origin.signals[1]!.aborted, true, 'nobody waits any more, so the fetch stops')
  })

  it('serves repeated reads from the memory cache without asking the disk', async () => {
    const [c] = testChunks(1)
    const origin = new TestSource('origin', [c!])
    const { resolver } = await testResolver({ remote: [origin], memory: new MemoryCache(1 << 20) })
    for (let i = 0; i < 8; i++) assert.deepEqual(await resolver.get(c!.ref, { signal }), c!.data)
    assert.equal(resolver.stats.sources.origin!.chunks, 1)
    assert.equal(resolver.stats.sources.memory!.chunks, 7)
    assert.equal(resolver.stats.sources.disk!.chunks, 0)
  })

  it('prefetches within its own concurrency budget, skipping cached chunks, into the disk cache only', async () => {
    const chunks = testChunks(20)
    const origin = new TestSource('origin', chunks, async chunk => {
      await new Promise(resolve => setTimeout(resolve, 2))
      return origin.table.get(chunk.digest)
    })
    const memory = new MemoryCache(1 << 20)
    const { resolver, disk } = await testResolver({ remote: [origin], memory, prefetchConcurrency: 3 })
    await resolver.get(chunks[0]!.ref, { signal })
    const result = await resolver.prefetch([...chunks, chunks[5]!].map(c => c.ref), { signal })
    assert.deepEqual(result, { requested: 20, cached: 1, resolved: 19, failed: 0 })
    assert.equal(origin.maxActive, 3)
    assert.equal(memory.stats.chunks, 1, 'prefetched chunks do not push read chunks out of memory')
    await until(() => disk.stats.writes === 20)
  })

  it('counts prefetch failures without rejecting', async () => {
    const chunks = testChunks(3)
    const origin = new TestSource('origin', chunks.slice(1))
    const { resolver } = await testResolver({ remote: [origin], attempts: 1 })
    assert.deepEqual(await resolver.prefetch(chunks.map(c => c.ref), { signal }), { requested: 3, cached: 0, resolved: 2, failed: 1 })
  })
})
