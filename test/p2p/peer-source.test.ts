import assert from 'node:assert/strict'
import { after, test } from 'node:test'
import { messageStreamToDuplex } from '@libp2p/utils'
import { pipe } from 'it-pipe'
import type { Digest } from '../../src/oci/digest.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { CHUNK_PROTOCOL, MAX_CLIENT_FRAME, decodeClientMessage, encodeChunkReply, encodeHave, frameDecoder } from '../../src/p2p/chunk-protocol.ts'
import { ChunkServer } from '../../src/p2p/chunk-server.ts'
import type { PeerNode } from '../../src/p2p/node.ts'
import { generatePsk } from '../../src/p2p/node.ts'
import { PeerChunkSource, type PeerChunkSourceOptions } from '../../src/p2p/peer-source.ts'
import { chunkKey, nodeKey, selectSources } from '../../src/p2p/rendezvous.ts'
import { MemoryChunks, StaticRouter, makePack, startNode, startNodes, waitFor, type TestChunk } from './helpers.ts'

async function serve (node: PeerNode, chunks: TestChunk[]): Promise<MemoryChunks> {
  const local = new MemoryChunks().add(...chunks)
  const server = new ChunkServer(node.libp2p, { local })
  await server.start()
  after(async () => await server.stop())
  return local
}

function source (node: PeerNode, peers: PeerNode[], options: Partial<PeerChunkSourceOptions> = {}): PeerChunkSource {
  return new PeerChunkSource({
    self: node.peerId,
    router: new StaticRouter(peers.map(p => p.peerId)),
    client: new ChunkClient(node.libp2p),
    bans: node.bans,
    ...options
  })
}

const signal = (): AbortSignal => AbortSignal.timeout(30_000)

/** Whether `first` comes before `second` in `requester`'s holder order for this chunk. */
function triedFirst (requester: PeerNode, first: PeerNode, second: PeerNode, digest: Digest): boolean {
  const [a, b] = [first, second].map(n => nodeKey(n.peerId.toString()))
  const order = selectSources({ key: chunkKey(digest), self: nodeKey(requester.peerId.toString()), swarm: [], holders: [a!, b!], excluded: () => false, maxParents: 1, maxHolders: 2 })
  return order.holders[0]!.id === a!.id
}

/** Whether `requester` is the root of this chunk's tree among `others` (it then hears availability before anything else). */
function isRoot (requester: PeerNode, others: PeerNode[], digest: Digest): boolean {
  return selectSources({ key: chunkKey(digest), self: nodeKey(requester.peerId.toString()), swarm: others.map(o => nodeKey(o.peerId.toString())), holders: [], excluded: () => false, maxParents: 3, maxHolders: 4 }).isRoot
}

/** A peer that answers every WANT with wrong bytes and claims to hold everything. */
async function serveHostile (node: PeerNode, chunks: TestChunk[], spoil: (bytes: Uint8Array) => Uint8Array): Promise<void> {
  const byDigest = new Map(chunks.map(c => [c.ref.digest, c.bytes]))
  await node.libp2p.handle(CHUNK_PROTOCOL, async stream => {
    await pipe(messageStreamToDuplex(stream).source, frameDecoder(MAX_CLIENT_FRAME), async frames => {
      for await (const frame of frames) {
        const message = decodeClientMessage(frame)
        if (message.type === 'have-query') stream.send(encodeHave(message.id, message.pack, [{ offset: 0, length: 1e12 }]))
        if (message.type !== 'want') continue
        for (const item of message.items) stream.send(encodeChunkReply(item.id, 'data', spoil(byDigest.get(item.digest)!)))
      }
    }).catch(() => {})
  })
}

for (const [kind, spoil] of [
  ['corrupted', (bytes: Uint8Array) => { const bad = Uint8Array.from(bytes); bad[bad.length >> 1]! ^= 0xff; return bad }],
  ['truncated', (bytes: Uint8Array) => bytes.subarray(0, bytes.length - 100)]
] as const) {
  test(`peer source: a peer that serves ${kind} bytes is banned, counted and disconnected; the chunk comes from another`, async () => {
    const [requester, hostile, honest] = await startNodes(3)
    const { chunks } = makePack(Array.from({ length: 20 }, () => 4096))
    await serveHostile(hostile!, chunks, spoil)
    await serve(honest!, chunks)
    assert.ok(chunks.some(c => triedFirst(requester!, hostile!, honest!, c.ref.digest)), 'precondition: the hostile peer is asked first for some chunk')
    const peers = source(requester!, [hostile!, honest!])

    for (const chunk of chunks) {
      const bytes = await peers.get(chunk.ref, { signal: signal() })
      assert.ok(bytes !== undefined && Buffer.from(bytes).equals(chunk.bytes), 'verified bytes from the honest peer')
    }
    assert.equal(peers.stats.verificationFailures, 1, 'one bad chunk, then the peer is never asked again')
    assert.equal(peers.stats.bans, 1)
    assert.equal(peers.stats.badPeers, 1)
    assert.equal(peers.stats.hits, 20)
    assert.equal(peers.stats.perPeerBytes.get(hostile!.peerId.toString()), undefined, 'bad bytes are not counted as received')
    assert.equal(peers.stats.perPeerBytes.get(honest!.peerId.toString()), 20 * 4096)
    assert.ok(requester!.bans.isBanned(hostile!.peerId.toString()))
    await waitFor('the hostile peer to be disconnected', () => requester!.connectedPeers().some(p => p.equals(hostile!.peerId)) || hostile!.connectedPeers().some(p => p.equals(requester!.peerId)) ? undefined : true)
    // The gater refuses it once its identity is known, after the handshake: its own dial may
    // briefly look successful, but no stream ever gets through.
    await hostile!.libp2p.dial(requester!.libp2p.getMultiaddrs()[0]!, { signal: AbortSignal.timeout(5000) }).catch(() => {})
    await assert.rejects(hostile!.libp2p.services.ping.ping(requester!.libp2p.getMultiaddrs()[0]!, { signal: AbortSignal.timeout(5000) }), 'a banned peer cannot connect back')
    assert.ok(!requester!.connectedPeers().some(p => p.equals(hostile!.peerId)))
  })
}

test('peer source: a slow holder is hedged; the loser is cancelled at the server', async () => {
  const [requester, slow, fast] = await startNodes(3)
  const { chunks } = makePack(Array.from({ length: 40 }, () => 2048))
  // The root of the chunk's tree: only a root waits for a pack's first availability answers, so it knows both holders.
  const chunk = chunks.find(c => triedFirst(requester!, slow!, fast!, c.ref.digest) && isRoot(requester!, [slow!, fast!], c.ref.digest))!
  const slowLocal = await serve(slow!, chunks)
  slowLocal.delayMs = 10_000
  await serve(fast!, chunks)
  const peers = source(requester!, [slow!, fast!], { hedgeDelayMs: 100, peerTimeoutMs: 20_000 })

  const bytes = await peers.get(chunk.ref, { signal: signal() })
  assert.ok(bytes !== undefined && Buffer.from(bytes).equals(chunk.bytes))
  assert.equal(peers.stats.hedges, 1)
  assert.equal(peers.stats.perPeerBytes.get(fast!.peerId.toString()), 2048)
  await waitFor('the slow peer to drop the cancelled request', () => slowLocal.aborted === 1 ? true : undefined)
  assert.equal(peers.stats.timeouts, 0, 'losing a hedge is not a failure')
})

test('peer source: a holder slower than the peer deadline is waited for while our own event loop runs that late', async () => {
  const [requester, holder] = await startNodes(2)
  const { chunks } = makePack([2048, 2048])
  const local = await serve(holder!, chunks)
  local.delayMs = 700
  // Only the holder path: no hedge partner, no parent, a budget far above the delay.
  const options = { hedgeDelayMs: 60_000, peerTimeoutMs: 300, maxParents: 0, maxWaitMs: 30_000 }
  const starved = source(requester!, [holder!], { ...options, lag: () => 1500 })
  const bytes = await starved.get(chunks[0]!.ref, { signal: signal() })
  assert.ok(bytes !== undefined && Buffer.from(bytes).equals(chunks[0]!.bytes))
  assert.equal(starved.stats.timeouts, 0)

  const unaware = source(requester!, [holder!], options)
  assert.equal(await unaware.get(chunks[1]!.ref, { signal: signal() }), undefined)
  assert.ok(unaware.stats.timeouts >= 1, 'without the allowance the same answer is late')
})

test('peer source: a holder killed mid-request is replaced at once by the next holder', async () => {
  const [requester, doomed, survivor] = await startNodes(3)
  const { chunks } = makePack(Array.from({ length: 40 }, () => 300_000))
  // A chunk whose root the requester is: it hears both holders before it asks anyone.
  const chunk = chunks.find(c => triedFirst(requester!, doomed!, survivor!, c.ref.digest) && isRoot(requester!, [doomed!, survivor!], c.ref.digest))!
  const doomedLocal = await serve(doomed!, chunks)
  doomedLocal.delayMs = 60_000
  await serve(survivor!, chunks)
  // No hedging and a long deadline: only the death can move the request on.
  const peers = source(requester!, [doomed!, survivor!], { hedgeDelayMs: 60_000, peerTimeoutMs: 60_000, maxWaitMs: 120_000 })

  const pending = peers.get(chunk.ref, { signal: AbortSignal.timeout(120_000) })
  await waitFor('the doomed peer to start on the request', () => doomedLocal.gets >= 1 ? true : undefined)
  await doomed!.stop()
  const bytes = await pending
  assert.ok(bytes !== undefined && Buffer.from(bytes).equals(chunk.bytes), 'the survivor served it')
  assert.equal(peers.stats.hedges, 0)

  // The dead peer is now skipped without waiting on it.
  const next = chunks.find(c => c !== chunk && triedFirst(requester!, doomed!, survivor!, c.ref.digest))!
  assert.ok(await peers.get(next.ref, { signal: signal() }) !== undefined)
})

test('peer source: when the only holder dies mid-request, get returns undefined (the resolver goes to the origin)', async () => {
  const [requester, doomed] = await startNodes(2)
  const { chunks } = makePack([100_000])
  const local = await serve(doomed!, chunks)
  local.delayMs = 60_000
  const peers = source(requester!, [doomed!], { peerTimeoutMs: 60_000, parentWaitMs: 60_000, maxWaitMs: 120_000 })
  const pending = peers.get(chunks[0]!.ref, { signal: AbortSignal.timeout(120_000) })
  await waitFor('the request to arrive', () => local.gets >= 1 ? true : undefined)
  await doomed!.stop()
  assert.equal(await pending, undefined)
  assert.equal(peers.stats.misses, 1)
})

test('peer source: the overall bound returns undefined when peers stall, and the caller\'s abort rejects', async () => {
  const [requester, staller] = await startNodes(2)
  const { chunks } = makePack([1000, 1000]) // a pack of one small chunk would be a whole blob, which goes to the origin
  const local = await serve(staller!, chunks)
  local.delayMs = 60_000
  const peers = source(requester!, [staller!], { maxWaitMs: 300 })
  assert.equal(await peers.get(chunks[0]!.ref, { signal: signal() }), undefined)

  const controller = new AbortController()
  const reason = new Error('FUSE request interrupted')
  const pending = peers.get(chunks[0]!.ref, { signal: controller.signal })
  controller.abort(reason)
  await assert.rejects(pending, err => err === reason)
})

test('peer source: a node without the swarm key cannot connect or fetch', async () => {
  const psk = generatePsk()
  const [member, server] = await startNodes(2, { psk })
  const { chunks } = makePack([5000, 5000]) // a pack of one small chunk would be a whole blob, which goes to the origin
  await serve(server!, chunks)
  const outsiders = [await startNode({ psk: generatePsk() }), await startNode()]

  const inside = await source(member!, [server!]).get(chunks[0]!.ref, { signal: signal() })
  assert.ok(inside !== undefined && Buffer.from(inside).equals(chunks[0]!.bytes), 'a member fetches')
  for (const outsider of outsiders) {
    await assert.rejects(outsider.libp2p.dial(server!.libp2p.getMultiaddrs()[0]!, { signal: AbortSignal.timeout(2000) }))
    const peers = source(outsider, [server!])
    assert.equal(await peers.get(chunks[0]!.ref, { signal: signal() }), undefined)
    assert.equal(peers.stats.hits, 0)
    assert.equal(outsider.connectedPeers().length, 0)
  }
})

test('peer source: isAsking names the parent a chunk is asked of, until it answers', async () => {
  const [child, parent] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 16 }, () => 4096))
  const [childKey, parentKey] = [child!, parent!].map(n => nodeKey(n.peerId.toString()))
  // A chunk for which the parent outranks the child, so the child asks it to fetch.
  const chunk = chunks.find(c => selectSources({ key: chunkKey(c.ref.digest), self: childKey!, swarm: [parentKey!], holders: [], excluded: () => false, maxParents: 1, maxHolders: 0 }).parents.length === 1)!
  const local = await serve(parent!, [])
  let release!: () => void
  const released = new Promise<void>(resolve => { release = resolve })
  local.fetch = async () => { await released; return chunk.bytes }
  const peers = source(child!, [parent!])
  const got = peers.get(chunk.ref, { signal: signal() })
  await waitFor('the parent request to arrive', () => local.gets > 0 ? true : undefined)
  assert.equal(peers.isAsking(chunk.ref.digest, parent!.peerId.toString()), true)
  assert.equal(peers.isAsking(chunk.ref.digest, child!.peerId.toString()), false)
  release()
  assert.ok(Buffer.from((await got)!).equals(chunk.bytes))
  assert.equal(peers.isAsking(chunk.ref.digest, parent!.peerId.toString()), false, 'forgotten once answered')
})
