import assert from 'node:assert/strict'
import { test } from 'node:test'
import { Uint8ArrayList } from 'uint8arraylist'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import {
  MAX_BATCH, MAX_CLIENT_FRAME, decodeClientMessage, decodeServerMessage, encodeCancel, encodeChunkReply, encodeHave,
  MAX_ADDRESSES, MAX_ADDRESS_BYTES, MAX_JOIN_KEYS, encodeHaveQuery, encodeJoin, encodeMembers, encodeWant, frameDecoder, normalizeRanges, rangesCover, type WantItem
} from '../../src/p2p/chunk-protocol.ts'
import { ProtocolViolationError } from '../../src/p2p/errors.ts'
import { TokenBucket } from '../../src/util/token-bucket.ts'

const digest = (s: string): Digest => sha256(Buffer.from(s))

/** Runs bytes through the frame decoder and returns the frame bodies. */
async function frames (chunks: Uint8Array[], maxFrame: number): Promise<Uint8Array[]> {
  const out: Uint8Array[] = []
  async function * source (): AsyncGenerator<Uint8Array> { yield * chunks }
  for await (const f of frameDecoder(maxFrame)(source())) out.push(f.subarray())
  return out
}

test('wire: WANT, CANCEL and HAVE? round-trip through framing', async () => {
  const items: WantItem[] = Array.from({ length: MAX_BATCH }, (_, i) => ({
    id: 0xfffffff0 + (i % 16), digest: digest(`c${i}`), length: i * 1000, fetch: i % 2 === 0, waitMs: i * 100
  }))
  const keys = Array.from({ length: MAX_JOIN_KEYS }, (_, i) => digest(`key ${i}`))
  const addresses = Array.from({ length: MAX_ADDRESSES }, (_, i) => `/ip4/10.0.0.${i}/tcp/4001/p2p/12D3KooW${'x'.repeat(MAX_ADDRESS_BYTES - 40)}`)
  const wire = Buffer.concat([encodeWant(items), encodeCancel(7), encodeHaveQuery(9, digest('pack')), encodeJoin(keys, addresses)])
  // split at awkward places: frames must reassemble
  const pieces = [wire.subarray(0, 3), wire.subarray(3, 1000), wire.subarray(1000)]
  const bodies = await frames(pieces, MAX_CLIENT_FRAME)
  assert.equal(bodies.length, 4)
  assert.equal(encodeWant(items).length - 4, MAX_CLIENT_FRAME, 'a full batch is exactly the server frame limit')
  assert.deepEqual(decodeClientMessage(bodies[0]!), { type: 'want', items })
  assert.deepEqual(decodeClientMessage(bodies[1]!), { type: 'cancel', id: 7 })
  assert.deepEqual(decodeClientMessage(bodies[2]!), { type: 'have-query', id: 9, pack: digest('pack') })
  assert.deepEqual(decodeClientMessage(bodies[3]!), { type: 'join', keys, addresses })
  assert.ok(encodeJoin(keys, addresses).length - 4 <= MAX_CLIENT_FRAME, 'the largest JOIN fits the server frame limit')
  assert.throws(() => encodeJoin([], []), RangeError)
})

test('wire: CHUNK and HAVE round-trip; ranges are normalised', async () => {
  const body = new Uint8Array(100_000).fill(7)
  const reply = encodeChunkReply(42, 'data', body)
  const [data] = await frames([reply.subarray()], 200_000)
  assert.deepEqual(decodeServerMessage(data!), { type: 'chunk', id: 42, status: 'data', bytes: body, zstd: false })
  const [packed] = await frames([encodeChunkReply(43, 'data', body, true).subarray()], 200_000)
  assert.deepEqual(decodeServerMessage(packed!), { type: 'chunk', id: 43, status: 'data', bytes: body, zstd: true })
  for (const status of ['dont-have', 'busy', 'pending'] as const) {
    const [f] = await frames([encodeChunkReply(1, status).subarray()], 100)
    assert.deepEqual(decodeServerMessage(f!), { type: 'chunk', id: 1, status })
  }
  const members = [{ id: '12D3KooWabc', addresses: ['/ip4/10.0.0.1/tcp/4001'] }, { id: '12D3KooWdef', addresses: [] }]
  const [m] = await frames([encodeMembers(digest('k'), members)], 10_000)
  assert.deepEqual(decodeServerMessage(m!), { type: 'members', key: digest('k'), members })
  const ranges = [{ offset: 2 ** 40, length: 5 }, { offset: 0, length: 10 }, { offset: 5, length: 10 }, { offset: 30, length: 0 }]
  const [have] = await frames([encodeHave(3, digest('p'), ranges)], 1000)
  assert.deepEqual(decodeServerMessage(have!), { type: 'have', id: 3, pack: digest('p'), ranges: [{ offset: 0, length: 15 }, { offset: 2 ** 40, length: 5 }] })
})

test('wire: hostile frames are protocol violations', async () => {
  // a length prefix over the limit is refused before the body arrives
  const huge = new Uint8Array(4)
  new DataView(huge.buffer).setUint32(0, MAX_CLIENT_FRAME + 1)
  await assert.rejects(frames([huge], MAX_CLIENT_FRAME), ProtocolViolationError)

  const reject = (bytes: number[], pattern: RegExp): void => {
    assert.throws(() => decodeClientMessage(new Uint8Array(bytes)), (err: unknown) => err instanceof ProtocolViolationError && pattern.test(err.message))
  }
  reject([0x01, 0], /WANT of 0 items/)
  reject([0x04, 0], /JOIN of 0 keys/)
  reject([0x04, 1, 1, 2, 3], /frame ends inside JOIN key/)
  reject([0x04, 33, ...new Array(33 * 32 + 1).fill(0)], /JOIN of 33 keys/)
  reject([0x04, 1, ...new Array(32).fill(0), 5], /JOIN with 5 addresses/)
  reject([0x01, MAX_BATCH + 1], /WANT of 65 items/)
  reject([0x01, 1, 0, 0], /ends inside WANT id/)
  reject([0x02, 0, 0, 0, 1, 99], /stray bytes after CANCEL/)
  reject([0x7f], /unknown client message type 0x7f/)

  const want = encodeWant([{ id: 1, digest: digest('x'), length: 1, fetch: false, waitMs: 0 }]).subarray(4)
  new DataView(want.buffer, want.byteOffset).setUint32(2 + 36, 64 * 1024 * 1024)
  assert.throws(() => decodeClientMessage(want), /WANT for a 67108864-byte chunk/)

  assert.throws(() => decodeServerMessage(new Uint8Array([0x81, 0, 0, 0, 1, 9])), /unknown CHUNK status 9/)
  const badLeb = new Uint8ArrayList(new Uint8Array([0x82, 0, 0, 0, 1]), new Uint8Array(32), new Uint8Array([0, 0, 0, 1]), new Uint8Array(9).fill(0xff))
  assert.throws(() => decodeServerMessage(badLeb), ProtocolViolationError)
})

test('ranges: cover checks need the whole chunk inside one range', () => {
  const ranges = normalizeRanges([{ offset: 100, length: 50 }, { offset: 0, length: 50 }, { offset: 50, length: 10 }])
  assert.deepEqual(ranges, [{ offset: 0, length: 60 }, { offset: 100, length: 50 }])
  assert.equal(rangesCover(ranges, 0, 60), true)
  assert.equal(rangesCover(ranges, 10, 51), false)
  assert.equal(rangesCover(ranges, 100, 50), true)
  assert.equal(rangesCover(ranges, 99, 2), false)
  assert.equal(rangesCover(ranges, 200, 1), false)
  assert.equal(rangesCover([], 0, 1), false)
})

test('token bucket: admits while not empty, then refuses until refilled', () => {
  let now = 0
  const bucket = new TokenBucket(1000, { now: () => now })
  assert.equal(bucket.tryTake(600), true)
  assert.equal(bucket.tryTake(600), true, 'the last admission may overdraw')
  assert.equal(bucket.tryTake(1), false, 'empty: over the limit')
  now += 150 // refills 150, still in debt by 50
  assert.equal(bucket.tryTake(1), false)
  now += 100
  assert.equal(bucket.tryTake(5000), true, 'a chunk larger than the bucket still passes once it is not empty')
  now += 10_000_000
  assert.equal(bucket.tryTake(1000), true)
  assert.equal(bucket.tryTake(1), false, 'refill is capped at capacity')
  assert.equal(new TokenBucket(Infinity).tryTake(1e12), true)
  assert.throws(() => new TokenBucket(0), RangeError)
})
