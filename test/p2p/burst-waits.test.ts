/**
 * The waits a burst's reads no longer make (docs/BENCHMARKS.md, 2026-12-06): small
 * whole blobs go to the origin without a round trip through the tree, a non-root's
 * first read of a pack does not wait for availability answers, and a swarm whose
 * members told us of themselves is an answer at once, with no DHT walk in the burst.
 * Fakes only (a clock that never fires, a requester, a routing stub), so each case
 * is decided by the code, not by this machine's load.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { test } from 'node:test'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { Codec } from '../../src/format/codec.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { PeerBans } from '../../src/p2p/bans.ts'
import type { ChunkReply, ChunkRequester, WantOptions } from '../../src/p2p/chunk-client.ts'
import type { ByteRange } from '../../src/p2p/chunk-protocol.ts'
import type { Clock } from '../../src/util/clock.ts'
import { DhtPackRouter } from '../../src/p2p/pack-router.ts'
import { PeerChunkSource } from '../../src/p2p/peer-source.ts'
import { chunkKey, nodeKey, selectSources } from '../../src/p2p/rendezvous.ts'
import { SwarmMembers } from '../../src/p2p/swarm-members.ts'
import { StaticRouter } from './helpers.ts'

async function peerIds (n: number): Promise<PeerId[]> {
  return await Promise.all(Array.from({ length: n }, async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519'))))
}

/** Time that stands still: no deadline, budget or hedge ever fires. A wait on one lasts until the caller's own signal. */
const frozen: Clock = {
  now: () => 1_000_000,
  sleep: async (_ms, signal) => await new Promise<void>((_resolve, reject) => signal?.addEventListener('abort', () => reject(signal.reason), { once: true })),
  timeout: () => new AbortController().signal
}

/** Serves BYTES for every want; availability answers come from `have` (default: never). */
class FakeRequester implements ChunkRequester {
  readonly wants: Array<{ peer: string, fetch: boolean }> = []
  haves = 0
  private readonly bytes: Uint8Array
  private readonly answerHave: (peer: PeerId) => Promise<ByteRange[]>
  constructor (bytes: Uint8Array, answerHave?: (peer: PeerId) => Promise<ByteRange[]>) {
    this.bytes = bytes
    this.answerHave = answerHave ?? (async () => await new Promise<ByteRange[]>(() => {}))
  }

  async want (peer: PeerId, _chunk: { digest: Digest, length: number }, options: WantOptions): Promise<ChunkReply> {
    this.wants.push({ peer: peer.toString(), fetch: options.fetch })
    return { status: 'data', bytes: this.bytes }
  }

  async have (peer: PeerId): Promise<ByteRange[]> {
    this.haves++
    return await this.answerHave(peer)
  }

  async disconnect (): Promise<void> {}
}

function packChunk (bytes: Uint8Array, pack: Digest): ChunkRef {
  return { digest: sha256(bytes), length: bytes.length, pack, packOffset: 0, storedLength: bytes.length, codec: Codec.none }
}

/** A chunk of a fresh pack for which SELF is (or is not) the root, with PEER as the only other swarm member. */
function chunkWhere (self: PeerId, peer: PeerId, root: boolean): { bytes: Uint8Array, ref: ChunkRef } {
  const pack = sha256(randomBytes(32))
  for (;;) {
    const bytes = randomBytes(4096)
    const ref = packChunk(bytes, pack)
    const selection = selectSources({ key: chunkKey(ref.digest), self: nodeKey(self.toString()), swarm: [nodeKey(peer.toString())], holders: [], excluded: () => false, maxParents: 3, maxHolders: 4 })
    if (selection.isRoot === root) return { bytes, ref }
  }
}

test('peer source: in a small swarm, a small whole blob (manifest, signature, config) goes to the origin without asking peers; a catalog-sized one, or one of a big swarm, asks them', async () => {
  const [self, peer] = await peerIds(2)
  const small = randomBytes(2000)
  const large = randomBytes(200 * 1024)
  // Availability answered at once (empty): whether this node is the large blob's root or not, it then asks the peer.
  const client = new FakeRequester(large, async () => [])
  const source = new PeerChunkSource({ self: self!, router: new StaticRouter([peer!]), client, bans: new PeerBans(), clock: frozen })
  const blob = (bytes: Uint8Array): ChunkRef => ({ ...packChunk(bytes, sha256(bytes)), pack: sha256(bytes) })

  assert.equal(await source.get(blob(small), { signal: AbortSignal.timeout(5000) }), undefined)
  assert.equal(client.wants.length, 0, 'no peer was asked for the small blob')
  assert.equal(client.haves, 0)
  assert.equal(source.stats.direct, 1)
  assert.equal(source.stats.misses, 1)

  const bytes = await source.get(blob(large), { signal: AbortSignal.timeout(5000) })
  assert.ok(bytes !== undefined && Buffer.from(bytes).equals(large), 'the catalog-sized blob came from the peer')
  assert.equal(source.stats.direct, 1)

  // A swarm of directBlobMaxSwarm others: peers share even the small blobs (the origin would send one per node).
  const bigSwarm = new PeerChunkSource({ self: self!, router: new StaticRouter([peer!]), client: new FakeRequester(small, async () => []), bans: new PeerBans(), clock: frozen, directBlobMaxSwarm: 1 })
  const shared = await bigSwarm.get(blob(small), { signal: AbortSignal.timeout(5000) })
  assert.ok(shared !== undefined && Buffer.from(shared).equals(small), 'the small blob came from the peer')
  assert.equal(bigSwarm.stats.direct, 0)
})

test('peer source: a non-root\'s first read of a pack asks its parent at once, without waiting for availability answers', async () => {
  const [self, peer] = await peerIds(2)
  const { bytes, ref } = chunkWhere(self!, peer!, false)
  // Availability answers never come, and no deadline fires: a read that waited for them would wait for good.
  const client = new FakeRequester(bytes)
  const source = new PeerChunkSource({ self: self!, router: new StaticRouter([peer!]), client, bans: new PeerBans(), clock: frozen })
  const got = await source.get(ref, { signal: AbortSignal.timeout(5000) })
  assert.ok(got !== undefined && Buffer.from(got).equals(bytes))
  assert.deepEqual(client.wants, [{ peer: peer!.toString(), fetch: true }], 'asked the parent to fetch it')
  assert.equal(client.haves, 1, 'availability was still asked for, in the background')
})

test('peer source: a root hears the pack\'s first availability answers before it goes to the origin, and takes a holder', async () => {
  const [self, peer] = await peerIds(2)
  const { bytes, ref } = chunkWhere(self!, peer!, true)
  const client = new FakeRequester(bytes, async () => await new Promise(resolve => setImmediate(() => resolve([{ offset: 0, length: 1 << 30 }]))))
  const source = new PeerChunkSource({ self: self!, router: new StaticRouter([peer!]), client, bans: new PeerBans(), clock: frozen })
  const got = await source.get(ref, { signal: AbortSignal.timeout(5000) })
  assert.ok(got !== undefined && Buffer.from(got).equals(bytes), 'from the holder, not the origin')
  assert.deepEqual(client.wants, [{ peer: peer!.toString(), fetch: false }], 'asked as a holder')
  assert.equal(source.stats.roots, 0)
})

/** A routing stub whose walks find nobody and end only when aborted; counts them. */
function stubRouting (self: PeerId): { routing: ConstructorParameters<typeof DhtPackRouter>[0], walks: () => number, ended: () => number } {
  let walks = 0
  let ended = 0
  const routing = {
    peerId: self,
    contentRouting: {
      // A burst's first walk: no records exist yet, so it finds nobody and ends only when stopped.
      async * findProviders (_cid: unknown, options: { signal?: AbortSignal } = {}) {
        walks++
        try {
          await new Promise<void>((_resolve, reject) => options.signal?.addEventListener('abort', () => reject(options.signal!.reason), { once: true }))
        } finally {
          ended++
        }
      },
      async provide () {},
      async cancelReprovide () {}
    }
  } as unknown as ConstructorParameters<typeof DhtPackRouter>[0]
  return { routing, walks: () => walks, ended: () => ended }
}

test('pack router: members that told us of themselves are a settled answer at once, and no first walk is made', async () => {
  const [self, member] = await peerIds(2)
  const key = sha256(randomBytes(32))
  const members = new SwarmMembers()
  members.own(key)
  members.add(key, member!, [])
  const { routing, walks } = stubRouting(self!)
  const router = new DhtPackRouter(routing, { members, lookupTimeoutMs: 60_000 })
  try {
    const answer = router.answer(key)
    assert.equal(answer.settled, true)
    assert.deepEqual(answer.peers.map(String), [member!.toString()])
    await router.settled(key, { signal: AbortSignal.timeout(1000) })
    assert.equal(walks(), 0, 'the walk would ask every DHT peer for records a burst has not written yet')
    assert.equal(router.stats.lookupsSkipped, 1)
  } finally {
    router.stop()
  }
})

test('pack router: a first lookup with nobody known walks, is settled as soon as a member tells of itself, and its walk stops then', async () => {
  const [self, member] = await peerIds(2)
  const key = sha256(randomBytes(32))
  const members = new SwarmMembers()
  members.own(key)
  const { routing, walks, ended } = stubRouting(self!)
  // Without the stop, the walk would run for its whole minute.
  const router = new DhtPackRouter(routing, { members, lookupTimeoutMs: 60_000 })
  try {
    assert.equal(router.answer(key).settled, false)
    assert.equal(walks(), 1)
    const settled = router.settled(key, { signal: AbortSignal.timeout(5000) })
    setImmediate(() => members.add(key, member!, []))
    await settled
    const answer = router.answer(key)
    assert.equal(answer.settled, true)
    assert.deepEqual(answer.peers.map(String), [member!.toString()])
    for (let i = 0; i < 100 && router.stats.lookupsStopped === 0; i++) await new Promise(resolve => setTimeout(resolve, 10))
    assert.equal(router.stats.lookupsStopped, 1)
    assert.equal(ended(), 1, 'the walk stopped')
    router.answer(key)
    assert.equal(walks(), 1, 'and no new one: the stopped walk is fresh for cacheTtlMs')
  } finally {
    router.stop()
  }
})

/** A catalog-sized whole blob for which SELF is (or is not) the root with PEER in the swarm. */
function blobWhere (self: PeerId, peer: PeerId, root: boolean): { bytes: Uint8Array, ref: ChunkRef } {
  for (;;) {
    const bytes = randomBytes(100 * 1024)
    const ref = { ...packChunk(bytes, sha256(bytes)), pack: sha256(bytes) }
    if (selectSources({ key: chunkKey(ref.digest), self: nodeKey(self.toString()), swarm: [nodeKey(peer.toString())], holders: [], excluded: () => false, maxParents: 3, maxHolders: 4 }).isRoot === root) return { bytes, ref }
  }
}

/** A chunk of a pack, and a catalog-sized whole blob, for which SELF is (or is not) the root with PEER in the swarm. */
function kinds (self: PeerId, peer: PeerId, root: boolean): Array<{ kind: string, bytes: Uint8Array, ref: ChunkRef }> {
  return [{ kind: 'chunk', ...chunkWhere(self, peer, root) }, { kind: 'whole blob', ...blobWhere(self, peer, root) }]
}

test('peer source: a root that no connected peer outranks goes to the origin at once, without the root wait', async () => {
  const [self, peer] = await peerIds(2)
  for (const { kind, bytes, ref } of kinds(self!, peer!, true)) {
    const router = { async announce () {}, answer: () => ({ peers: [], settled: true }), async settled () {} }
    for (const connected of [[], [peer!]]) {
      // Time stands still: a root that waited would wait until the get's own signal aborted it.
      const source = new PeerChunkSource({ self: self!, router, client: new FakeRequester(bytes, async () => []), bans: new PeerBans(), clock: frozen, connected: () => connected })
      assert.equal(await source.get(ref, { signal: AbortSignal.timeout(5000) }), undefined, `the origin's job (${kind}, connected: ${connected.length})`)
      assert.equal(source.stats.roots, 1)
    }
  }
})

test('peer source: a root waits for a connected peer that would outrank it to join, then asks it as its parent', async () => {
  const [self, peer] = await peerIds(2)
  for (const { kind, bytes, ref } of kinds(self!, peer!, false)) {
    // PEER is connected but joins the swarm 200 ms after our first look; the wait's cap (a minute) is not what ends it.
    let known: PeerId[] = []
    const router = { async announce () {}, answer: () => ({ peers: known, settled: true }), async settled () {} }
    setTimeout(() => { known = [peer!] }, 200)
    const client = new FakeRequester(bytes, async () => [])
    const source = new PeerChunkSource({ self: self!, router, client, bans: new PeerBans(), rootWaitMs: 60_000, connected: () => [peer!] })
    const got = await source.get(ref, { signal: AbortSignal.timeout(10_000) })
    assert.ok(got !== undefined && Buffer.from(got).equals(bytes), `the ${kind} came from the parent that joined, not the origin`)
    assert.deepEqual(client.wants, [{ peer: peer!.toString(), fetch: true }])
    assert.equal(source.stats.roots, 0)
  }
})

test('peer source: in a big view of the swarm a chunk\'s root does not wait for connected outsiders; a whole blob\'s still does', async () => {
  const [self, peer] = await peerIds(2)
  const [chunk, blob] = kinds(self!, peer!, false)
  const router = { async announce () {}, answer: () => ({ peers: [], settled: true }), async settled () {} }
  // rootWaitMaxSwarm 1: this node alone is already a "big" view. Time stands still, so a wait would last until the get's own signal.
  const options = { self: self!, router, bans: new PeerBans(), clock: frozen, connected: () => [peer!], rootWaitMaxSwarm: 1 }
  const chunkSource = new PeerChunkSource({ ...options, client: new FakeRequester(chunk!.bytes, async () => []) })
  assert.equal(await chunkSource.get(chunk!.ref, { signal: AbortSignal.timeout(5000) }), undefined, 'the chunk went to the origin at once')
  assert.equal(chunkSource.stats.roots, 1)
  const blobSource = new PeerChunkSource({ ...options, client: new FakeRequester(blob!.bytes, async () => []) })
  const started = Date.now()
  assert.equal(await blobSource.get(blob!.ref, { signal: AbortSignal.timeout(300) }).catch(() => 'waited'), 'waited', 'the blob waited for PEER to join')
  assert.ok(Date.now() - started >= 250)
})

test('pack router: a wait for a first lookup that members end leaves no rejection behind when its signal aborts later', async () => {
  const [self, member] = await peerIds(2)
  const key = sha256(randomBytes(32))
  const members = new SwarmMembers()
  members.own(key)
  const { routing } = stubRouting(self!)
  const router = new DhtPackRouter(routing, { members, lookupTimeoutMs: 60_000 })
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  try {
    // As a peer's CANCEL reaches the wait of a fetch made for it: the signal aborts after the wait ended.
    const controller = new AbortController()
    const settled = router.settled(key, { signal: controller.signal })
    setImmediate(() => members.add(key, member!, []))
    await settled
    controller.abort(new Error('cancelled by the requester'))
    await new Promise(resolve => setTimeout(resolve, 50))
    assert.deepEqual(unhandled, [])
  } finally {
    process.off('unhandledRejection', onUnhandled)
    router.stop()
  }
})
