import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import { backgroundFetch, imageChunksInPackOrder, type PackLister } from '../../src/agent/background-fetch.ts'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { Codec } from '../../src/format/codec.ts'
import type { Digest } from '../../src/oci/digest.ts'
import type { PrefetchResult } from '../../src/fetch/resolver.ts'
import { inPackOrder } from '../../src/image/prefetch-list.ts'

const digest = (name: string): Digest => `sha256:${Buffer.from(name).toString('hex').padEnd(64, '0').slice(0, 64)}` as Digest
const chunk = (name: string, pack: string, packOffset: number): ChunkRef => ({ digest: digest(name), length: 10, pack: digest(pack), packOffset, storedLength: 10, codec: Codec.none })

/** A layer's catalog: packs in order, each with its chunks in pack order. */
function layer (packs: Record<string, ChunkRef[]>): PackLister {
  return {
    packs: () => Object.keys(packs).map(p => ({ digest: digest(p) })),
    packChunks: pack => Object.entries(packs).find(([p]) => digest(p) === pack)?.[1] ?? []
  }
}

const lower = layer({ p1: [chunk('a', 'p1', 0), chunk('b', 'p1', 10)], p2: [chunk('c', 'p2', 0)] })
// The upper layer shares chunk b (dedup across layers) and adds d.
const upper = layer({ p3: [chunk('b', 'p1', 10), chunk('d', 'p3', 0)] })

/** A resolver's prefetch that records the slices it was given. */
function recorder (): { slices: string[][], prefetch: (chunks: ChunkRef[], o: { signal: AbortSignal }) => Promise<PrefetchResult> } {
  const slices: string[][] = []
  const names = new Map(['a', 'b', 'c', 'd'].map(n => [digest(n), n]))
  return {
    slices,
    prefetch: async chunks => {
      slices.push(chunks.map(c => names.get(c.digest)!))
      return { requested: chunks.length, cached: 0, resolved: chunks.length, failed: 0 }
    }
  }
}

describe('background fetch', () => {
  test('every chunk of every layer once, layer by layer, pack by pack, in pack order', () => {
    assert.deepEqual(imageChunksInPackOrder([lower, upper]).map(c => c.digest), ['a', 'b', 'c', 'd'].map(digest))
  })

  test('waits for the prefetch list, then for quiet, then fetches the image in slices', async () => {
    const r = recorder()
    const events: string[] = []
    let listDone!: () => void
    const startAfter = new Promise<void>(resolve => { listDone = resolve }).then(() => { events.push('list done') })
    let lastMiss = performance.now()
    const done = backgroundFetch({
      catalogs: [lower, upper],
      prefetch: async (chunks, o) => { events.push('slice'); return await r.prefetch(chunks, o) },
      sinceLastMiss: () => performance.now() - lastMiss,
      signal: new AbortController().signal,
      startAfter,
      quietMs: 50,
      sliceChunks: 3
    })
    await new Promise(resolve => setTimeout(resolve, 30))
    assert.deepEqual(events, [], 'nothing before the prefetch list is done')
    lastMiss = performance.now() // a demand miss just now: the start-up reads are still going
    listDone()
    const result = await done
    assert.deepEqual(events, ['list done', 'slice', 'slice'])
    assert.deepEqual(r.slices, [['a', 'b', 'c'], ['d']])
    assert.deepEqual(result, { requested: 4, cached: 0, resolved: 4, failed: 0, complete: true })
  })

  test('a demand miss between slices makes the next slice wait for quiet again', async () => {
    const r = recorder()
    let lastMiss = -Infinity
    const sliceTimes: number[] = []
    const started = performance.now()
    await backgroundFetch({
      catalogs: [lower, upper],
      prefetch: async (chunks, o) => {
        sliceTimes.push(performance.now() - started)
        lastMiss = performance.now() // the container missed while this slice ran
        return await r.prefetch(chunks, o)
      },
      sinceLastMiss: () => performance.now() - lastMiss,
      signal: new AbortController().signal,
      quietMs: 80,
      sliceChunks: 2
    })
    assert.equal(sliceTimes.length, 2)
    assert.ok(sliceTimes[0]! < 40, `no miss yet: the first slice starts at once (${sliceTimes[0]} ms)`)
    assert.ok(sliceTimes[1]! - sliceTimes[0]! >= 75, `the second slice waited for quiet (${sliceTimes[1]! - sliceTimes[0]!} ms)`)
  })

  test('stops when the mount goes away, and says it did not finish', async () => {
    const r = recorder()
    const controller = new AbortController()
    const result = await backgroundFetch({
      catalogs: [lower, upper],
      prefetch: async (chunks, o) => { controller.abort(); return await r.prefetch(chunks, o) },
      sinceLastMiss: () => Infinity,
      signal: controller.signal,
      sliceChunks: 1
    })
    assert.equal(r.slices.length, 1)
    assert.equal(result.complete, false)
  })
})

describe('prefetch lists in pack order', () => {
  test('sorted by pack, then by offset in the pack, so neighbours merge into one range request', () => {
    const list = [chunk('x', 'p2', 30), chunk('y', 'p1', 50), chunk('z', 'p2', 0), chunk('w', 'p1', 0)]
    assert.deepEqual(inPackOrder(list).map(c => [c.pack, c.packOffset]), [[digest('p1'), 0], [digest('p1'), 50], [digest('p2'), 0], [digest('p2'), 30]])
  })
})
