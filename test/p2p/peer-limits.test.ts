/**
 * The limits that keep a hostile peer from costing this node more than a
 * client would (issue 15): each one on its own, small and fast. The floods at
 * the volumes, against a victim process, are in hostile.test.ts.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, test } from 'node:test'
import type { Stream } from '@libp2p/interface'
import type { PeerId } from '@libp2p/interface'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { sleep } from '../../src/util/limit.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import {
  CHUNK_PROTOCOL, MAX_CLIENT_FRAME, clientMessageType, decodeServerMessage, encodeCancel, encodeChunkReply, encodeHave, encodeHaveQuery, encodeJoin,
  encodeWant, frameDecoder, withRequestId, type ByteRange
} from '../../src/p2p/chunk-protocol.ts'
import { ChunkServer, type ChunkServerOptions } from '../../src/p2p/chunk-server.ts'
import type { PeerNode } from '../../src/p2p/node.ts'
import { SwarmMembers } from '../../src/p2p/swarm-members.ts'
import { TokenBucket } from '../../src/util/token-bucket.ts'
import { MemoryChunks, makePack, startNodes, waitFor, type TestChunk } from './helpers.ts'

const key = (i: number): Digest => sha256(Buffer.from(`swarm ${i}`))
// Ids only need toString().
const fake = (i: number): PeerId => ({ toString: () => `peer-${i}` }) as unknown as PeerId

async function serve (node: PeerNode, local: MemoryChunks, options: Partial<ChunkServerOptions> = {}): Promise<ChunkServer> {
  const server = new ChunkServer(node.libp2p, { local, ...options })
  await server.start()
  after(async () => await server.stop())
  return server
}

/** A raw chunk stream that never reads a byte of the answers: its flow control stops the server at one window. */
async function pausedStream (from: PeerNode, to: PeerNode): Promise<Stream> {
  const stream = await from.libp2p.dialProtocol(to.peerId, CHUNK_PROTOCOL)
  stream.pause()
  return stream
}

function wants (chunks: TestChunk[], firstId: number): Uint8Array {
  return encodeWant(chunks.map((c, i) => ({ id: firstId + i, digest: c.ref.digest, length: c.ref.length, fetch: false, waitMs: 0 })))
}

test('protocol: withRequestId re-addresses an encoded answer; clientMessageType reads a frame\'s type; a length prefix split byte by byte decodes', async () => {
  const pack = sha256(Buffer.from('pack'))
  const ranges: ByteRange[] = [{ offset: 0, length: 10 }, { offset: 20, length: 5 }]
  const once = encodeHave(0, pack, ranges)
  const again = withRequestId(once, 77)
  assert.deepEqual(again, encodeHave(77, pack, ranges))
  assert.equal(new DataView(once.buffer).getUint32(5), 0, 'the cached frame is not modified')

  const bodies = [encodeHaveQuery(1, pack), encodeJoin([pack], []), encodeCancel(3), wants(makePack([5]).chunks, 4)]
  const wire = Buffer.concat(bodies)
  const pieces = Array.from(wire, b => Uint8Array.of(b)) // every byte its own chunk
  const frames: Uint8Array[] = []
  for await (const f of frameDecoder(MAX_CLIENT_FRAME)((async function * () { yield * pieces })())) frames.push(f.subarray())
  assert.deepEqual(frames.map(f => clientMessageType(f)), ['have-query', 'join', 'cancel', 'want'])
  assert.equal(clientMessageType(Uint8Array.of(0x7f)), undefined)
})

test('token bucket: waitMs says how long until it admits', () => {
  let now = 0
  const bucket = new TokenBucket(10, { capacity: 2, now: () => now })
  assert.equal(bucket.waitMs(), 0)
  assert.ok(bucket.tryTake(1) && bucket.tryTake(1))
  assert.equal(bucket.tryTake(1), false)
  assert.equal(bucket.waitMs(), 1, 'empty, not overdrawn: admits as soon as anything comes back')
  now = 50
  assert.equal(bucket.waitMs(), 0)
  assert.ok(bucket.tryTake(3), 'overdraws')
  assert.equal(bucket.waitMs(), 250, '2.5 tokens short at 10/s')
})

test('SwarmMembers: foreign swarms are a bounded LRU that expires; swarms this node joined stay', () => {
  let now = 0
  const members = new SwarmMembers({ foreign: { maxKeys: 3, maxMembers: 10, ttlMs: 1000 }, now: () => now })
  members.own(key(0))
  members.add(key(0), fake(0), [])
  for (let i = 1; i <= 5; i++) members.add(key(i), fake(i), [])
  assert.equal(members.keyCount(), 4, 'its own key and the last 3 foreign ones')
  assert.ok(members.isOwn(key(0)) && !members.isOwn(key(5)))
  assert.deepEqual(members.of(key(1)), [], 'the least recently mentioned went first')
  assert.equal(members.of(key(5)).length, 1)

  // Members over all foreign keys: the least recently mentioned swarm goes when they pass the cap.
  for (let i = 10; i < 17; i++) members.add(key(5), fake(i), [])
  assert.equal(members.of(key(5)).length, 8)
  assert.equal(members.keyCount(), 4, '1 + 1 + 8 foreign members: at the cap')
  members.add(key(4), fake(20), [])
  assert.equal(members.keyCount(), 3, 'one more: the least recently mentioned swarm went')
  assert.deepEqual(members.of(key(3)), [])

  // Not mentioned for ttlMs: forgotten at the next mention of another key; own keys never.
  now = 5000
  let woken = false
  void members.changed(key(4), AbortSignal.timeout(10_000)).then(() => { woken = true })
  now = 7000
  members.add(key(9), fake(9), [])
  assert.equal(members.keyCount(), 2, 'its own and the new one')
  assert.equal(members.of(key(0)).length, 1)
  members.own(key(9))
  for (let i = 100; i < 120; i++) members.add(key(i), fake(i), [])
  assert.ok(members.of(key(9)).length === 1 && members.of(key(0)).length === 1, 'own swarms are never shed')
  return Promise.resolve().then(() => assert.ok(woken, 'a waiter on a forgotten swarm is woken to look again'))
})

test('ChunkServer: availability is scanned once per pack per haveCacheMs, capped at maxHaveRanges, and each answer carries its own id', async () => {
  const [a, b] = await startNodes(2)
  const { pack, chunks } = makePack(Array.from({ length: 40 }, () => 100))
  const local = new MemoryChunks().add(...chunks.filter((_, i) => i % 2 === 0)) // 20 ranges
  let scans = 0
  const held = local.held.bind(local)
  local.held = async (p: Digest) => { scans++; return await held(p) }
  await serve(b!, local, { maxHaveRanges: 5, haveCacheMs: 60_000 })
  const client = new ChunkClient(a!.libp2p)
  const answers = await Promise.all(Array.from({ length: 50 }, async () => await client.have(b!.peerId, pack, { signal: AbortSignal.timeout(10_000) })))
  assert.equal(scans, 1, 'one scan served 50 queries')
  for (const ranges of answers) assert.deepEqual(ranges, [0, 2, 4, 6, 8].map(i => ({ offset: i * 100, length: 100 })), 'the first 5 ranges')
  client.close()
})

test('ChunkServer: availability queries beyond a peer\'s rate are read at its rate, every one answered in full', async () => {
  const [a, b] = await startNodes(2)
  const { pack, chunks } = makePack([100, 100])
  const server = await serve(b!, new MemoryChunks().add(...chunks), { haveQueriesPerSecond: 20, haveBurst: 2 })
  const client = new ChunkClient(a!.libp2p)
  const started = performance.now()
  const answers = await Promise.all(Array.from({ length: 8 }, async () => await client.have(b!.peerId, pack, { signal: AbortSignal.timeout(10_000) })))
  const ms = performance.now() - started
  assert.ok(answers.every(r => r.length === 1 && r[0]!.length === 200), JSON.stringify(answers))
  assert.ok(ms >= 250, `6 over the burst at 20/s take about 300 ms: ${Math.round(ms)} ms`)
  assert.ok(server.stats.throttled >= 5, JSON.stringify(server.stats))
  client.close()
})

test('ChunkServer: JOINs beyond a peer\'s rate are read at its rate', async () => {
  const [a, b] = await startNodes(2)
  const members = new SwarmMembers()
  const server = await serve(b!, new MemoryChunks(), { members, joinsPerSecond: 10, joinBurst: 2 })
  const stream = await a!.libp2p.dialProtocol(b!.peerId, CHUNK_PROTOCOL)
  for (let i = 0; i < 6; i++) stream.send(encodeJoin([key(i)], []))
  await waitFor('the first two JOINs', () => members.keyCount() >= 2 ? true : undefined)
  assert.ok(members.keyCount() <= 3, `the burst, not all six: ${members.keyCount()}`)
  await waitFor('the rest, at 10/s', () => members.keyCount() === 6 ? true : undefined)
  assert.ok(server.stats.throttled >= 3)
  stream.abort(new Error('done'))
})

test('ChunkServer: the cap on requests in progress holds over all peers, whatever their identities', async () => {
  const [server, ...requesters] = await startNodes(3)
  const { chunks } = makePack([1000, 1000])
  const local = new MemoryChunks().add(...chunks)
  local.delayMs = 300
  const chunkServer = await serve(server!, local, { maxConcurrentRequests: 2 })
  const clients = requesters.map(r => new ChunkClient(r.libp2p))
  const statuses = (await Promise.all(clients.map(async client =>
    await Promise.all(chunks.map(async c => (await client.want(server!.peerId, c.ref, { fetch: false, waitMs: 0, signal: AbortSignal.timeout(10_000) })).status))))).flat()
  assert.deepEqual(statuses.sort(), ['busy', 'busy', 'data', 'data'])
  assert.equal(chunkServer.stats.busyAllPeers, 2)
  for (const client of clients) client.close()
})

test('ChunkServer: bytes queued for all peers are capped; a peer that takes nothing is closed after stallMs, and what it held is released', async () => {
  const [server, attacker, client] = await startNodes(3)
  // The paused peer's flow-control window (256 KiB to 1 MiB by then) takes the start of the first chunk; the rest stays queued here.
  const { chunks } = makePack(Array.from({ length: 4 }, () => 2 * 1024 * 1024))
  const chunkServer = await serve(server!, new MemoryChunks().add(...chunks), { maxQueuedBytes: 3 * 1024 * 1024, stallMs: 1000 })
  const paused = await pausedStream(attacker!, server!)
  paused.send(wants(chunks.slice(0, 3), 1))
  await waitFor('the paused peer to hold the cap', () => chunkServer.stats.busyQueueFull >= 1 ? true : undefined)
  assert.ok(chunkServer.stats.queuedBytes >= 1024 * 1024 && chunkServer.stats.queuedBytes <= 3 * 1024 * 1024, `${chunkServer.stats.queuedBytes} bytes queued`)

  const requester = new ChunkClient(client!.libp2p)
  const refused = await requester.want(server!.peerId, chunks[3]!.ref, { fetch: false, waitMs: 0, signal: AbortSignal.timeout(10_000) })
  assert.deepEqual(refused, { status: 'busy' }, 'another peer is refused while the cap is full')

  await waitFor('the paused stream to be closed', () => chunkServer.stats.stalled === 1 ? true : undefined)
  await waitFor('its bytes to be released', () => chunkServer.stats.queuedBytes === 0 && chunkServer.stats.inProgress === 0 ? true : undefined)
  const served = await requester.want(server!.peerId, chunks[3]!.ref, { fetch: false, waitMs: 0, signal: AbortSignal.timeout(10_000) })
  assert.equal(served.status, 'data')
  requester.close()
})

test('ChunkServer: a peer that reads nothing gets a bounded number of answers; the rest of its requests are not read', async () => {
  const [server, attacker] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 64 }, () => 64 * 1024))
  const chunkServer = await serve(server!, new MemoryChunks().add(...chunks), { stallMs: 60_000 })
  const paused = await pausedStream(attacker!, server!)
  for (let frame = 0; frame < 100; frame++) paused.send(wants(chunks, 1 + frame * 64))
  await waitFor('reads to pause', () => chunkServer.stats.readsPaused >= 1 ? true : undefined)
  await sleep(500)
  const { requests, inProgress } = chunkServer.stats
  // What its flow-control window took (up to 1 MiB by then), a slot's worth held, a frame of busy answers, and what one slice of the read loop read.
  assert.ok(requests <= 8 * 64, `requests read: ${requests} of 6,400`)
  assert.ok(inProgress <= 64, `in progress: ${inProgress}`)
  await sleep(500)
  assert.equal(chunkServer.stats.requests, requests, 'no more read while it takes nothing')
  paused.abort(new Error('done'))
  await waitFor('everything released', () => chunkServer.stats.queuedBytes === 0 && chunkServer.stats.inProgress === 0 ? true : undefined)
})

test('ChunkServer: a reply waits for room on its peer\'s stream rather than being refused', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 6 }, () => 300 * 1024))
  const chunkServer = await serve(b!, new MemoryChunks().add(...chunks), { maxQueuedBytesPerPeer: 512 * 1024 })
  const client = new ChunkClient(a!.libp2p)
  const replies = await Promise.all(chunks.map(async c => await client.want(b!.peerId, c.ref, { fetch: false, waitMs: 0, signal: AbortSignal.timeout(10_000) })))
  assert.ok(replies.every((r, i) => r.status === 'data' && Buffer.from(r.bytes).equals(chunks[i]!.bytes)))
  assert.equal(chunkServer.stats.busy, 0)
  client.close()
})

test('ChunkServer: small answers of one turn leave in one write, and each request still gets its own', async () => {
  const [a, b] = await startNodes(2)
  await serve(b!, new MemoryChunks())
  const stream = await a!.libp2p.dialProtocol(b!.peerId, CHUNK_PROTOCOL)
  const messages: number[] = []
  let reads = 0
  stream.addEventListener('message', () => { reads++ })
  const done = (async () => {
    for await (const frame of frameDecoder(1 << 20)(stream)) {
      const message = decodeServerMessage(frame)
      if (message.type === 'chunk') messages.push(message.id)
      if (messages.length === 64) return
    }
  })()
  stream.send(encodeWant(Array.from({ length: 64 }, (_, i) => ({ id: i + 1, digest: sha256(randomBytes(8)), length: 8, fetch: false, waitMs: 0 }))))
  await done
  assert.deepEqual(messages.sort((x, y) => x - y), Array.from({ length: 64 }, (_, i) => i + 1))
  assert.ok(reads <= 2, `64 dont-have answers arrived in ${reads} pieces`)
  stream.abort(new Error('done'))
  void encodeChunkReply
})
