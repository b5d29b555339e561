import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { OriginError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import type { Descriptor } from '../../src/oci/types.ts'
import { HttpOrigin } from '../../src/origin/http-origin.ts'
import type { Origin } from '../../src/origin/origin.ts'
import { RangeReader } from '../../src/origin/range-reader.ts'
import { startOriginServer, type OriginServer } from '../../src/origin/server.ts'
import { bytes, makeLayout, until, type TestLayout } from './helpers.ts'

const KiB = 1024
const MiB = 1024 * KiB
const A = `sha256:${'a'.repeat(64)}` as Digest
const B = `sha256:${'b'.repeat(64)}` as Digest

interface Call { blob: Digest, offset: number, length: number, signal: AbortSignal | undefined }

/**
 * An in-memory origin that records every getRange. With `hold`, calls wait
 * until `release()` (or their signal aborts), so tests can act while a request
 * is in flight.
 */
class FakeOrigin implements Origin {
  readonly name = 'fake'
  readonly calls: Call[] = []
  readonly blobs = new Map<Digest, Uint8Array>([[A, bytes(16 * MiB, 1)], [B, bytes(1 * MiB, 2)]])
  hold = false
  failWith: unknown
  private waiting: Array<() => void> = []

  release (): void {
    for (const go of this.waiting.splice(0)) go()
  }

  async resolve (): Promise<Descriptor> { throw new Error('not used') }
  async getBlob (): Promise<Uint8Array> { throw new Error('not used') }

  async getRange (blob: Digest, offset: number, length: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    this.calls.push({ blob, offset, length, signal: options.signal })
    if (this.hold) {
      await new Promise<void>((resolve, reject) => {
        this.waiting.push(resolve)
        options.signal?.addEventListener('abort', () => reject(options.signal!.reason), { once: true })
      })
    }
    if (this.failWith !== undefined) throw this.failWith
    return this.blobs.get(blob)!.subarray(offset, offset + length)
  }
}

describe('RangeReader merging', () => {
  test('a lone read goes out on the next turn of the event loop, not after a timer; reads made after an await in the same turn still merge', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    const lone = reader.read(B, 0, 100)
    // Before any timer of 1 ms could fire: the request is out once setImmediate callbacks ran.
    await new Promise(resolve => setImmediate(resolve))
    assert.equal(origin.calls.length, 1)
    await lone
    // Reads that arrive a few microtasks apart (a resolver checking its caches first) share a request.
    const reads = Array.from({ length: 4 }, async (_, i) => {
      for (let hop = 0; hop < i * 3; hop++) await Promise.resolve()
      return await reader.read(A, i * 1000, 1000)
    })
    await Promise.all(reads)
    assert.deepEqual(origin.calls.slice(1).map(c => [c.offset, c.length]), [[0, 4000]])
  })

  test('16 adjacent 64 KiB reads issued together become one request', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    const reads = Array.from({ length: 16 }, (_, i) => reader.read(A, i * 64 * KiB, 64 * KiB))
    const results = await Promise.all(reads)
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[0, MiB]])
    const data = origin.blobs.get(A)!
    results.forEach((r, i) => assert.deepEqual(r, data.subarray(i * 64 * KiB, (i + 1) * 64 * KiB)))
    assert.deepEqual(reader.stats, { reads: 16, requests: 1, merged: 15, bytesFetched: MiB })
  })

  test('reads far apart get separate requests; reads within maxGap share one', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin, maxGap: 64 * KiB })
    const data = origin.blobs.get(A)!
    const spec: Array<[number, number]> = [
      [0, 10 * KiB],
      [10 * KiB + 64 * KiB, 1 * KiB], // gap of exactly maxGap: merged
      [MiB, 4 * KiB], // far: its own request
      [MiB + 4 * KiB + 64 * KiB + 1, 100] // one byte past maxGap: its own request
    ]
    const results = await Promise.all(spec.map(([o, l]) => reader.read(A, o, l)))
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [
      [0, 75 * KiB],
      [MiB, 4 * KiB],
      [MiB + 68 * KiB + 1, 100]
    ])
    results.forEach((r, i) => assert.deepEqual(r, data.subarray(spec[i]![0], spec[i]![0] + spec[i]![1])))
  })

  test('overlapping and duplicate reads merge and each gets its own slice', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    const data = origin.blobs.get(A)!
    const spec: Array<[number, number]> = [[100, 1000], [500, 100], [100, 1000], [900, 5000]]
    const results = await Promise.all(spec.map(([o, l]) => reader.read(A, o, l)))
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[100, 5800]])
    results.forEach((r, i) => assert.deepEqual(r, data.subarray(spec[i]![0], spec[i]![0] + spec[i]![1])))
  })

  test('merged requests never exceed maxRangeBytes, unless one read alone is larger', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin, maxRangeBytes: 4 * MiB })
    const data = origin.blobs.get(A)!
    const reads = Array.from({ length: 12 }, (_, i) => reader.read(A, i * MiB, MiB))
    const results = await Promise.all(reads)
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[0, 4 * MiB], [4 * MiB, 4 * MiB], [8 * MiB, 4 * MiB]])
    results.forEach((r, i) => assert.deepEqual(r, data.subarray(i * MiB, (i + 1) * MiB)))

    origin.calls.length = 0
    const [big, small] = await Promise.all([reader.read(A, 0, 6 * MiB), reader.read(A, 6 * MiB, KiB)])
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[0, 6 * MiB], [6 * MiB, KiB]])
    assert.deepEqual(big, data.subarray(0, 6 * MiB))
    assert.deepEqual(small, data.subarray(6 * MiB, 6 * MiB + KiB))
  })

  test('different blobs are never merged', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    const [a, b] = await Promise.all([reader.read(A, 0, 100), reader.read(B, 100, 100)])
    assert.deepEqual(origin.calls.map(c => [c.blob, c.offset, c.length]), [[A, 0, 100], [B, 100, 100]])
    assert.deepEqual(a, origin.blobs.get(A)!.subarray(0, 100))
    assert.deepEqual(b, origin.blobs.get(B)!.subarray(100, 200))
  })

  test('reads in separate batch windows are separate requests', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    await reader.read(A, 0, 100)
    await reader.read(A, 100, 100)
    assert.equal(origin.calls.length, 2)
  })

  test('a read inside a request already in flight joins it', async () => {
    const origin = new FakeOrigin()
    origin.hold = true
    const reader = new RangeReader({ origin })
    const first = reader.read(A, 0, MiB)
    await until(() => origin.calls.length === 1)
    const inside = reader.read(A, 1000, 2000)
    const outside = reader.read(A, MiB - 10, 20) // sticks out: needs its own request
    await until(() => origin.calls.length === 2)
    origin.release()
    const data = origin.blobs.get(A)!
    assert.deepEqual(await first, data.subarray(0, MiB))
    assert.deepEqual(await inside, data.subarray(1000, 3000))
    assert.deepEqual(await outside, data.subarray(MiB - 10, MiB + 10))
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[0, MiB], [MiB - 10, 20]])
    assert.equal(reader.stats.merged, 1)
  })

  test('readMany: one request, results in the caller\'s order', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin, batchWindowMs: 60_000 }) // readMany must not wait for it
    const data = origin.blobs.get(A)!
    const ranges = [{ offset: 8192, length: 4096 }, { offset: 0, length: 4096 }, { offset: 4096, length: 4096 }, { offset: 100, length: 0 }]
    const results = await reader.readMany(A, ranges)
    assert.deepEqual(origin.calls.map(c => [c.offset, c.length]), [[0, 12288]])
    results.forEach((r, i) => assert.deepEqual(r, data.subarray(ranges[i]!.offset, ranges[i]!.offset + ranges[i]!.length)))
  })

  test('an origin failure rejects every read of the merged request', async () => {
    const origin = new FakeOrigin()
    origin.failWith = new OriginError('boom', { status: 503, retryable: true })
    const reader = new RangeReader({ origin })
    const reads = [reader.read(A, 0, 10), reader.read(A, 10, 10)]
    for (const r of reads) await assert.rejects(r, /boom/)
    assert.equal(origin.calls.length, 1)
  })

  test('an origin that returns the wrong length is caught', async () => {
    const origin = new FakeOrigin()
    origin.getRange = async () => new Uint8Array(5)
    const reader = new RangeReader({ origin })
    await assert.rejects(reader.read(A, 0, 10), /returned 5 bytes instead of 10/)
  })

  test('invalid ranges are refused', async () => {
    const reader = new RangeReader({ origin: new FakeOrigin() })
    await assert.rejects(reader.read(A, -1, 10), RangeError)
    await assert.rejects(reader.read(A, 0, Number.NaN), RangeError)
  })
})

describe('RangeReader aborts', () => {
  test('aborting one read of a merged request rejects only it; the request goes on', async () => {
    const origin = new FakeOrigin()
    origin.hold = true
    const reader = new RangeReader({ origin })
    const controller = new AbortController()
    const mine = reader.read(A, 0, 100, { signal: controller.signal })
    const theirs = reader.read(A, 100, 100)
    await until(() => origin.calls.length === 1)
    const reason = new Error('mine gave up')
    controller.abort(reason)
    await assert.rejects(mine, err => err === reason)
    assert.equal(origin.calls[0]!.signal!.aborted, false)
    origin.release()
    assert.deepEqual(await theirs, origin.blobs.get(A)!.subarray(100, 200))
  })

  test('when every read of a request aborts, the request is aborted', async () => {
    const origin = new FakeOrigin()
    origin.hold = true
    const reader = new RangeReader({ origin })
    const c1 = new AbortController()
    const c2 = new AbortController()
    const r1 = reader.read(A, 0, 100, { signal: c1.signal })
    const r2 = reader.read(A, 100, 100, { signal: c2.signal })
    await until(() => origin.calls.length === 1)
    c1.abort(new Error('one'))
    assert.equal(origin.calls[0]!.signal!.aborted, false)
    c2.abort(new Error('two'))
    assert.equal(origin.calls[0]!.signal!.aborted, true)
    await assert.rejects(r1, /one/)
    await assert.rejects(r2, /two/)
    // An aborted request is not joined by later reads.
    origin.hold = false
    assert.deepEqual(await reader.read(A, 0, 50), origin.blobs.get(A)!.subarray(0, 50))
    assert.equal(origin.calls.length, 2)
  })

  test('a read aborted during the batch window sends nothing', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin, batchWindowMs: 20 })
    const controller = new AbortController()
    const gone = reader.read(A, 0, 100, { signal: controller.signal })
    const kept = reader.read(B, 0, 100)
    controller.abort(new Error('early'))
    await assert.rejects(gone, /early/)
    await kept
    assert.deepEqual(origin.calls.map(c => c.blob), [B])
  })

  test('an already aborted signal rejects at once', async () => {
    const origin = new FakeOrigin()
    const reader = new RangeReader({ origin })
    await assert.rejects(reader.read(A, 0, 1, { signal: AbortSignal.abort(new Error('before')) }), /before/)
    await assert.rejects(reader.readMany(A, [{ offset: 0, length: 1 }], { signal: AbortSignal.abort(new Error('before')) }), /before/)
    assert.equal(origin.calls.length, 0)
  })
})

describe('RangeReader over HTTP', () => {
  let fx: TestLayout
  let server: OriginServer
  before(async () => {
    fx = await makeLayout()
    server = await startOriginServer({ dir: fx.dir, host: '127.0.0.1', port: 0 })
  })
  after(async () => {
    await server.close()
    await fx.cleanup()
  })

  test('16 adjacent 64 KiB reads reach the server as one range request', async () => {
    const reader = new RangeReader({ origin: new HttpOrigin(server.url) })
    const before = server.stats.requests
    const results = await Promise.all(Array.from({ length: 16 }, (_, i) => reader.read(fx.big.digest, 512 * KiB + i * 64 * KiB, 64 * KiB)))
    assert.equal(server.stats.requests - before, 1)
    results.forEach((r, i) => assert.deepEqual(r, fx.big.data.subarray(512 * KiB + i * 64 * KiB, 512 * KiB + (i + 1) * 64 * KiB)))
    assert.equal(reader.stats.bytesFetched, MiB)
  })
})
