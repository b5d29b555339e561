import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, test } from 'node:test'
import { zstdCompressSync } from 'node:zlib'
import { messageStreamToDuplex } from '@libp2p/utils'
import { pipe } from 'it-pipe'
import { sha256 } from '../../src/oci/digest.ts'
import { sleep } from '../../src/util/limit.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { CHUNK_PROTOCOL, MAX_CHUNK_BYTES, MAX_CLIENT_FRAME, decodeClientMessage, encodeChunkReply, frameDecoder } from '../../src/p2p/chunk-protocol.ts'
import { ChunkServer } from '../../src/p2p/chunk-server.ts'
import { ProtocolViolationError } from '../../src/p2p/errors.ts'
import type { PeerNode } from '../../src/p2p/node.ts'
import { MemoryChunks, makePack, startNodes, waitFor } from './helpers.ts'

const want = { fetch: false, waitMs: 0 }

async function serve (node: PeerNode, local: MemoryChunks, options: Partial<ConstructorParameters<typeof ChunkServer>[1]> = {}): Promise<ChunkServer> {
  const server = new ChunkServer(node.libp2p, { local, ...options })
  await server.start()
  after(async () => await server.stop())
  return server
}

test('exchange: hundreds of chunks, batched on one long-lived stream, byte-exact', async () => {
  const [a, b] = await startNodes(2)
  const sizes = [...Array.from({ length: 300 }, (_, i) => 1 + (i * 7919) % 65_536), ...Array.from({ length: 20 }, () => 1024 * 1024), MAX_CHUNK_BYTES]
  const { pack, chunks } = makePack(sizes)
  const server = await serve(b!, new MemoryChunks().add(...chunks))
  const client = new ChunkClient(a!.libp2p)

  const replies = await Promise.all(chunks.map(async c => await client.want(b!.peerId, c.ref, { ...want, signal: AbortSignal.timeout(60_000) })))
  for (const [i, reply] of replies.entries()) {
    assert.equal(reply.status, 'data')
    if (reply.status === 'data') assert.ok(Buffer.from(reply.bytes).equals(chunks[i]!.bytes), `chunk ${i} intact`)
  }
  assert.equal(client.stats.streams, 1, 'one stream for everything')
  assert.equal(client.stats.wants, chunks.length)
  // 32 unanswered at most (the window), refilled as answers come: many wants per frame
  assert.ok(client.stats.wantFrames <= chunks.length / 4, `${chunks.length} wants went out in ${client.stats.wantFrames} frames`)
  assert.equal(server.stats.served, chunks.length)
  assert.equal(server.stats.busy, 0, 'the client window keeps it under the server\'s per-peer cap')

  // concurrent wants from one turn of the event loop share one frame
  const framesBefore = client.stats.wantFrames
  await Promise.all(chunks.slice(0, 32).map(async c => await client.want(b!.peerId, c.ref, { ...want, signal: AbortSignal.timeout(60_000) })))
  assert.equal(client.stats.wantFrames - framesBefore, 1)

  // a second round reuses the same stream
  const again = await client.want(b!.peerId, chunks[0]!.ref, { ...want, signal: AbortSignal.timeout(10_000) })
  assert.equal(again.status, 'data')
  assert.equal(client.stats.streams, 1)

  const unknown = await client.want(b!.peerId, { digest: sha256(Buffer.from('nope')), length: 4 }, { ...want, signal: AbortSignal.timeout(10_000) })
  assert.deepEqual(unknown, { status: 'dont-have' })
  const ranges = await client.have(b!.peerId, pack, { signal: AbortSignal.timeout(10_000) })
  assert.deepEqual(ranges, [{ offset: 0, length: sizes.reduce((x, y) => x + y, 0) }], 'a complete pack is one range')
  assert.deepEqual(await client.have(b!.peerId, sha256(Buffer.from('other pack')), { signal: AbortSignal.timeout(10_000) }), [])
  client.close()
})

test('exchange: per-peer concurrency cap answers busy instead of queueing', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 6 }, () => 1000))
  const local = new MemoryChunks().add(...chunks)
  local.delayMs = 300
  const server = await serve(b!, local, { maxConcurrentPerPeer: 2 })
  const client = new ChunkClient(a!.libp2p)
  const replies = await Promise.all(chunks.map(async c => await client.want(b!.peerId, c.ref, { ...want, signal: AbortSignal.timeout(10_000) })))
  assert.deepEqual(replies.map(r => r.status).sort(), ['busy', 'busy', 'busy', 'busy', 'data', 'data'])
  assert.equal(server.stats.busy, 4)
  client.close()
})

test('exchange: holder requests from more than maxHolderPeers peers are busy; parent requests are not limited by it', async () => {
  const [server, ...requesters] = await startNodes(4)
  const { chunks } = makePack(Array.from({ length: 4 }, () => 1000))
  const local = new MemoryChunks().add(...chunks)
  local.delayMs = 300
  await serve(server!, local, { maxHolderPeers: 2 })
  const clients = requesters.map(r => new ChunkClient(r.libp2p))
  const ask = async (fetch: boolean): Promise<string[][]> => await Promise.all(clients.map(async client =>
    (await Promise.all(chunks.map(async c => await client.want(server!.peerId, c.ref, { fetch, waitMs: fetch ? 5000 : 0, signal: AbortSignal.timeout(10_000) })))).map(r => r.status)))
  const holder = await ask(false)
  const served = holder.filter(statuses => statuses.every(s => s === 'data')).length
  const refused = holder.filter(statuses => statuses.every(s => s === 'busy')).length
  assert.deepEqual([served, refused], [2, 1], `per requester: ${JSON.stringify(holder)}`)
  assert.ok((await ask(true)).every(statuses => statuses.every(s => s === 'data')))
  for (const client of clients) client.close()
})

test('exchange: chunks stored compressed travel as zstd and arrive byte-exact; incompressible ones travel raw', async () => {
  const [a, b] = await startNodes(2)
  const text = Buffer.from('shoal '.repeat(100_000)) // compresses well
  const noise = randomBytes(300_000) // does not
  const { chunks } = makePack([text.length, noise.length], i => i === 0 ? text : noise)
  const local = new MemoryChunks().add(...chunks)
  local.compressible = () => true
  const server = await serve(b!, local)
  const client = new ChunkClient(a!.libp2p)
  const [compressed, raw] = await Promise.all(chunks.map(async c => await client.want(b!.peerId, c.ref, { ...want, signal: AbortSignal.timeout(10_000) })))
  assert.ok(compressed!.status === 'data' && Buffer.from(compressed!.bytes).equals(text))
  assert.ok(raw!.status === 'data' && Buffer.from(raw!.bytes).equals(noise))
  assert.ok(server.stats.bytesServed < noise.length + text.length / 10, `${server.stats.bytesServed} bytes on the wire for ${text.length + noise.length}`)
  assert.ok(server.stats.bytesServed >= noise.length)
  client.close()
})

test('exchange: a zstd frame that does not decode, or decodes past the asked length, is a protocol violation', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack([1000])
  const bomb = zstdCompressSync(Buffer.alloc(10_000))
  await b!.libp2p.handle(CHUNK_PROTOCOL, async stream => {
    let n = 0
    await pipe(messageStreamToDuplex(stream).source, frameDecoder(MAX_CLIENT_FRAME), async frames => {
      for await (const frame of frames) {
        const message = decodeClientMessage(frame)
        if (message.type !== 'want') continue
        for (const item of message.items) stream.send(encodeChunkReply(item.id, 'data', n++ === 0 ? randomBytes(500) : bomb, true))
      }
    }).catch(() => {})
  })
  const client = new ChunkClient(a!.libp2p)
  for (let i = 0; i < 2; i++) {
    await assert.rejects(client.want(b!.peerId, chunks[0]!.ref, { ...want, signal: AbortSignal.timeout(10_000) }), (err: unknown) => err instanceof ProtocolViolationError)
  }
  client.close()
})

test('exchange: the upload token bucket answers busy beyond the byte rate', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 10 }, () => 64 * 1024))
  const server = await serve(b!, new MemoryChunks().add(...chunks), { uploadBytesPerSecond: 100_000 })
  const client = new ChunkClient(a!.libp2p)
  const replies = await Promise.all(chunks.map(async c => await client.want(b!.peerId, c.ref, { ...want, signal: AbortSignal.timeout(10_000) })))
  const served = replies.filter(r => r.status === 'data').length
  // a 100 kB bucket admits two 64 KiB chunks (the second overdraws), then refuses
  assert.equal(served, 2, `served ${served} of 10`)
  assert.equal(server.stats.busy, 8)
  assert.equal(server.stats.bytesServed, 2 * 64 * 1024)
  client.close()
})

test('exchange: a parent request waits for the fetch, answers pending when the wait runs out, and is cancellable', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack([5000, 5000])
  const local = new MemoryChunks()
  let fetches = 0
  local.fetch = async (digest, signal) => {
    fetches++
    await sleep(600, signal)
    const chunk = chunks.find(c => c.ref.digest === digest)!
    local.add(chunk)
    return chunk.bytes
  }
  const server = await serve(b!, local)
  const client = new ChunkClient(a!.libp2p)

  const first = await client.want(b!.peerId, chunks[0]!.ref, { fetch: true, waitMs: 50, signal: AbortSignal.timeout(10_000) })
  assert.deepEqual(first, { status: 'pending' })
  await waitFor('the fetch to go on after pending and land', () => local.chunks.has(chunks[0]!.ref.digest) ? true : undefined)
  const second = await client.want(b!.peerId, chunks[0]!.ref, { fetch: true, waitMs: 5000, signal: AbortSignal.timeout(10_000) })
  assert.equal(second.status, 'data')
  assert.equal(fetches, 1, 'the second ask found the chunk the first one started')
  assert.equal(server.stats.parentRequests, 2)

  // without the fetch flag a missing chunk is dont-have at once, and no fetch starts
  assert.deepEqual(await client.want(b!.peerId, chunks[1]!.ref, { ...want, signal: AbortSignal.timeout(10_000) }), { status: 'dont-have' })
  const before = fetches

  // a cancelled request aborts the server-side work
  local.delayMs = 5000
  const controller = new AbortController()
  const cancelled = client.want(b!.peerId, chunks[0]!.ref, { ...want, signal: controller.signal })
  await waitFor('the request to reach the server', () => local.gets >= 4 ? true : undefined)
  controller.abort(new Error('hedge won elsewhere'))
  await assert.rejects(cancelled, /hedge won elsewhere/)
  await waitFor('the server to drop the cancelled request', () => local.aborted === 1 ? true : undefined)
  assert.equal(fetches, before)
  client.close()
})

test('exchange: a client that sends an oversized frame gets its stream reset', async () => {
  const [a, b] = await startNodes(2)
  const server = await serve(b!, new MemoryChunks())
  const stream = await a!.libp2p.dialProtocol(b!.peerId, CHUNK_PROTOCOL)
  const header = new Uint8Array(4)
  new DataView(header.buffer).setUint32(0, 100 * 1024 * 1024)
  stream.send(header)
  await waitFor('the server to count the violation', () => server.stats.violations === 1 ? true : undefined)
  await waitFor('the stream to be reset', () => stream.status !== 'open' ? true : undefined)

  // the connection itself is fine: a well-behaved request still works
  const client = new ChunkClient(a!.libp2p)
  const { chunks } = makePack([10])
  assert.deepEqual(await client.want(b!.peerId, chunks[0]!.ref, { ...want, signal: AbortSignal.timeout(10_000) }), { status: 'dont-have' })
  client.close()
})

test('exchange: when the requester disappears, the server abandons its work for it', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack([10])
  const local = new MemoryChunks().add(...chunks)
  local.delayMs = 60_000
  await serve(b!, local)
  const client = new ChunkClient(a!.libp2p)
  const pending = client.want(b!.peerId, chunks[0]!.ref, { ...want, signal: AbortSignal.timeout(60_000) })
  await waitFor('the request to arrive', () => local.gets === 1 ? true : undefined)
  await a!.stop()
  await assert.rejects(pending, /unavailable: the chunk stream closed/)
  await waitFor('the server to abort the work', () => local.aborted === 1 ? true : undefined)
})
