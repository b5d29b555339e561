import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { describe, it } from 'node:test'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { Codec } from '../../src/format/codec.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { NodeChunks, SERVING_DEFAULTS, type ChunkLocator, type ChunkStore } from '../../src/p2p/local-chunks.ts'

function chunk (i: number): { ref: ChunkRef, bytes: Uint8Array } {
  const bytes = randomBytes(64)
  return { ref: { digest: sha256(bytes), length: 64, pack: 'sha256:' + 'a'.repeat(64) as Digest, packOffset: i * 64, storedLength: 64, codec: i % 2 === 0 ? Codec.none : Codec.zstd }, bytes }
}

/** A locator over a map that can learn digests later (as the agent's index does when a catalog opens). */
class MapLocator implements ChunkLocator {
  readonly refs = new Map<Digest, ChunkRef>()
  private readonly waiters = new Set<() => void>()
  learn (ref: ChunkRef): void {
    this.refs.set(ref.digest, ref)
    for (const wake of [...this.waiters]) wake()
  }

  locate (digest: Digest): ChunkRef | undefined { return this.refs.get(digest) }
  async locateSoon (digest: Digest, signal: AbortSignal): Promise<ChunkRef | undefined> {
    while (this.refs.get(digest) === undefined && !signal.aborted) {
      await new Promise<void>(resolve => {
        const wake = (): void => { this.waiters.delete(wake); signal.removeEventListener('abort', wake); resolve() }
        this.waiters.add(wake)
        signal.addEventListener('abort', wake, { once: true })
      })
    }
    return this.refs.get(digest)
  }

  packChunks (pack: Digest): ChunkRef[] { return [...this.refs.values()].filter(r => r.pack === pack) }
}

/** A store holding some chunks; fetches wait until released (or their signal aborts). */
class GatedStore implements ChunkStore {
  readonly held_ = new Map<Digest, Uint8Array>()
  readonly fetching = new Map<Digest, () => void>()
  fetches = 0
  private readonly bytes: Map<Digest, Uint8Array>
  constructor (bytes: Map<Digest, Uint8Array>) { this.bytes = bytes }
  async held (ref: ChunkRef): Promise<Uint8Array | undefined> { return this.held_.get(ref.digest) }
  has (digest: Digest): boolean { return this.held_.has(digest) }
  async fetch (ref: ChunkRef, signal: AbortSignal): Promise<Uint8Array> {
    this.fetches++
    await new Promise<void>((resolve, reject) => {
      this.fetching.set(ref.digest, resolve)
      signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true })
    })
    this.fetching.delete(ref.digest)
    return this.bytes.get(ref.digest)!
  }
}

function setup (count: number, limits?: ConstructorParameters<typeof NodeChunks>[0]['limits'], isAsking?: (digest: Digest, from: string) => boolean): { chunks: ReturnType<typeof chunk>[], locator: MapLocator, store: GatedStore, local: NodeChunks } {
  const chunks = Array.from({ length: count }, (_, i) => chunk(i))
  const locator = new MapLocator()
  for (const c of chunks) locator.learn(c.ref)
  const store = new GatedStore(new Map(chunks.map(c => [c.ref.digest, c.bytes])))
  const local = new NodeChunks({ locator, store, ...(limits !== undefined ? { limits } : {}), ...(isAsking !== undefined ? { isAsking } : {}) })
  return { chunks, locator, store, local }
}

const settle = async (): Promise<void> => { await new Promise(resolve => setImmediate(resolve)) }

describe('NodeChunks (the serving policy)', () => {
  it('has its numbers in SERVING_DEFAULTS', () => {
    assert.equal(SERVING_DEFAULTS.maxFetchesForPeers, 32)
    assert.equal(SERVING_DEFAULTS.locateWaitMs, 5000)
    assert.deepEqual(setup(0).local.limits, SERVING_DEFAULTS)
  })

  it(`fetches for peers at most ${SERVING_DEFAULTS.maxFetchesForPeers} chunks at once; beyond that, dont-have at once`, async () => {
    const limit = SERVING_DEFAULTS.maxFetchesForPeers
    const { chunks, store, local } = setup(limit + 2)
    const signal = AbortSignal.timeout(30_000)
    const parents = chunks.slice(0, limit).map(async c => await local.get(c.ref.digest, { signal, fetch: true, from: 'child' }))
    await settle()
    assert.equal(store.fetches, limit)
    assert.equal(local.stats.fetchesForPeers, limit)
    assert.equal(await local.get(chunks[limit]!.ref.digest, { signal, fetch: true, from: 'child' }), undefined, 'over the limit')
    assert.equal(local.stats.fetchLimited, 1)
    assert.equal(store.fetches, limit, 'no fetch started beyond the limit')
    // A chunk already held is served whatever the limit: it costs no fetch.
    store.held_.set(chunks[limit + 1]!.ref.digest, chunks[limit + 1]!.bytes)
    assert.deepEqual(await local.get(chunks[limit + 1]!.ref.digest, { signal, fetch: true, from: 'child' }), chunks[limit + 1]!.bytes)
    for (const release of store.fetching.values()) release()
    const got = await Promise.all(parents)
    assert.deepEqual(got, chunks.slice(0, limit).map(c => c.bytes))
    assert.equal(local.stats.fetchesForPeers, 0, 'every slot came back')
    // With the slots back, the one refused before is fetched.
    const again = local.get(chunks[limit]!.ref.digest, { signal, fetch: true, from: 'child' })
    await settle()
    store.fetching.get(chunks[limit]!.ref.digest)!()
    assert.deepEqual(await again, chunks[limit]!.bytes)
  })

  it('a holder request (no fetch flag) is answered from what is held, never fetched', async () => {
    const { chunks, store, local } = setup(2)
    store.held_.set(chunks[0]!.ref.digest, chunks[0]!.bytes)
    const signal = AbortSignal.timeout(30_000)
    assert.deepEqual(await local.get(chunks[0]!.ref.digest, { signal, fetch: false, from: 'p' }), chunks[0]!.bytes)
    assert.equal(await local.get(chunks[1]!.ref.digest, { signal, fetch: false, from: 'p' }), undefined)
    assert.equal(store.fetches, 0)
  })

  it('a locate miss: dont-have at once for a holder request, after locateWaitMs for a parent request', async () => {
    const { store, local } = setup(0, { locateWaitMs: 100 })
    const unknown = sha256(Buffer.from('no catalog names this'))
    const signal = AbortSignal.timeout(30_000)
    let started = performance.now()
    assert.equal(await local.get(unknown, { signal, fetch: false, from: 'p' }), undefined)
    assert.ok(performance.now() - started < 50, 'no wait without the fetch flag')
    started = performance.now()
    assert.equal(await local.get(unknown, { signal, fetch: true, from: 'p' }), undefined)
    assert.ok(performance.now() - started >= 90, `waited locateWaitMs (${performance.now() - started} ms)`)
    assert.equal(local.stats.notLocated, 2)
    assert.equal(store.fetches, 0, 'nothing a catalog does not vouch for is fetched')
  })

  it('a parent request for a digest learnt while it waits is fetched', async () => {
    const locator = new MapLocator()
    const c = chunk(0)
    const store2 = new GatedStore(new Map([[c.ref.digest, c.bytes]]))
    const waiting = new NodeChunks({ locator, store: store2 }).get(c.ref.digest, { signal: AbortSignal.timeout(30_000), fetch: true, from: 'p' })
    await settle()
    assert.equal(store2.fetches, 0)
    locator.learn(c.ref)
    await settle()
    store2.fetching.get(c.ref.digest)!()
    assert.deepEqual(await waiting, c.bytes)
  })

  it('abort: a cancelled request stops waiting for the locator, and a cancelled fetch gives its slot back', async () => {
    const { chunks, store, local } = setup(1, { maxFetchesForPeers: 1 })
    const waiting = new AbortController()
    const located = local.get(sha256(Buffer.from('unknown')), { signal: waiting.signal, fetch: true, from: 'p' })
    waiting.abort()
    assert.equal(await located, undefined)
    const fetching = new AbortController()
    const fetch = local.get(chunks[0]!.ref.digest, { signal: fetching.signal, fetch: true, from: 'p' })
    await settle()
    assert.equal(local.stats.fetchesForPeers, 1)
    fetching.abort(new Error('the child cancelled'))
    await assert.rejects(fetch, /the child cancelled/)
    assert.equal(local.stats.fetchesForPeers, 0)
    assert.equal(store.fetches, 1)
  })

  it('does not fetch for a peer it is itself asking for that chunk (they would wait on each other)', async () => {
    const { chunks, store, local } = setup(1, undefined, (digest, from) => digest === chunks[0]!.ref.digest && from === 'parent')
    const signal = AbortSignal.timeout(30_000)
    assert.equal(await local.get(chunks[0]!.ref.digest, { signal, fetch: true, from: 'parent' }), undefined)
    assert.equal(store.fetches, 0)
    const other = local.get(chunks[0]!.ref.digest, { signal, fetch: true, from: 'someone else' })
    await settle()
    store.fetching.get(chunks[0]!.ref.digest)!()
    assert.deepEqual(await other, chunks[0]!.bytes)
  })

  it('answers availability with the held chunks\' ranges, and compression by the catalog\'s codec', async () => {
    const { chunks, store, local } = setup(4)
    store.held_.set(chunks[1]!.ref.digest, chunks[1]!.bytes)
    store.held_.set(chunks[2]!.ref.digest, chunks[2]!.bytes)
    assert.deepEqual(await local.held(chunks[0]!.ref.pack), [{ offset: 64, length: 64 }, { offset: 128, length: 64 }])
    assert.equal(local.compressible(chunks[1]!.ref.digest), true)
    assert.equal(local.compressible(chunks[2]!.ref.digest), false)
    assert.equal(local.compressible(sha256(Buffer.from('unknown'))), false)
  })
})
