import assert from 'node:assert/strict'
import { after, test } from 'node:test'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { sha256 } from '../../src/oci/digest.ts'
import { sleep } from '../../src/util/limit.ts'
import { AnnounceError } from '../../src/p2p/errors.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { ChunkServer } from '../../src/p2p/chunk-server.ts'
import { DhtPackRouter, packCid } from '../../src/p2p/pack-router.ts'
import type { PeerNode } from '../../src/p2p/node.ts'
import { SwarmMembers } from '../../src/p2p/swarm-members.ts'
import { MemoryChunks, startNode, startNodes, waitFor } from './helpers.ts'

async function collect (peers: AsyncIterable<PeerId>): Promise<string[]> {
  const out: string[] = []
  for await (const peer of peers) out.push(peer.toString())
  return out.sort()
}

test('pack router: 5 nodes find each other\'s pack announcements through the DHT', async () => {
  const nodes = await startNodes(5)
  const routers = nodes.map(node => new DhtPackRouter(node.libp2p, { cacheTtlMs: 0 }))
  const pack = sha256(Buffer.from('pack one'))
  assert.equal(packCid(pack).multihash.code, 0x12)
  assert.deepEqual(Buffer.from(packCid(pack).multihash.digest).toString('hex'), pack.slice(7))

  // Routing tables fill asynchronously after the connections come up; announce once they do.
  await waitFor('routing tables', async () => {
    try {
      await routers[1]!.announce(pack, { signal: AbortSignal.timeout(5000) })
      return true
    } catch { return undefined }
  })
  await routers[3]!.announce(pack, { signal: AbortSignal.timeout(10_000) })
  const expected = [nodes[1]!, nodes[3]!].map(n => n.peerId.toString()).sort()
  for (const [i, router] of routers.entries()) {
    const others = expected.filter(id => id !== nodes[i]!.peerId.toString())
    const found = await waitFor(`node ${i} to see both announcers`, async () => {
      const seen = await collect(router.holders(pack, { signal: AbortSignal.timeout(10_000) }))
      return others.every(id => seen.includes(id)) ? seen : undefined
    })
    assert.ok(!found.includes(nodes[i]!.peerId.toString()), 'a node is never its own holder')
  }
  assert.deepEqual(await collect(routers[0]!.holders(sha256(Buffer.from('nobody has this')), { signal: AbortSignal.timeout(10_000) })), [])
  for (const router of routers) router.stop()
})

test('pack router: lookups are cached and shared; callers arriving mid-walk get the same answer', async () => {
  const nodes = await startNodes(3)
  const announcer = new DhtPackRouter(nodes[1]!.libp2p)
  const pack = sha256(Buffer.from('pack two'))
  await waitFor('announce', async () => await announcer.announce(pack, { signal: AbortSignal.timeout(5000) }).then(() => true, () => undefined))
  const router = new DhtPackRouter(nodes[0]!.libp2p, { cacheTtlMs: 60_000 })
  const answers = await Promise.all(Array.from({ length: 10 }, async () => await collect(router.holders(pack, { signal: AbortSignal.timeout(10_000) }))))
  for (const answer of answers) assert.deepEqual(answer, [nodes[1]!.peerId.toString()])
  assert.equal(router.stats.lookups, 1, 'one DHT walk for ten concurrent callers')
  assert.equal(router.stats.lookupsShared, 9)
  await collect(router.holders(pack, { signal: AbortSignal.timeout(10_000) }))
  assert.equal(router.stats.lookups, 1, 'a later caller within the TTL reuses it')
  await announcer.withdraw(pack, { signal: AbortSignal.timeout(5000) })
  router.stop()
  announcer.stop()
})

test('pack router: an expired lookup answers at once with the last result while a new walk runs', async () => {
  const nodes = await startNodes(3)
  const pack = sha256(Buffer.from('pack three'))
  const first = new DhtPackRouter(nodes[1]!.libp2p)
  await waitFor('announce', async () => await first.announce(pack, { signal: AbortSignal.timeout(5000) }).then(() => true, () => undefined))
  const router = new DhtPackRouter(nodes[0]!.libp2p, { cacheTtlMs: 100 })
  assert.deepEqual(await collect(router.holders(pack, { signal: AbortSignal.timeout(10_000) })), [nodes[1]!.peerId.toString()])

  const second = new DhtPackRouter(nodes[2]!.libp2p)
  await waitFor('announce', async () => await second.announce(pack, { signal: AbortSignal.timeout(5000) }).then(() => true, () => undefined))
  await sleep(150)
  // An aborted signal proves the answer needs no waiting: it comes from the last walk.
  assert.deepEqual(await collect(router.holders(pack, { signal: AbortSignal.abort() })), [nodes[1]!.peerId.toString()])
  assert.equal(router.stats.lookups, 2, 'the stale answer started a new walk')
  await waitFor('the new walk to find the second announcer', async () => {
    const seen = await collect(router.holders(pack, { signal: AbortSignal.timeout(10_000) }))
    return seen.length === 2 ? true : undefined
  })
  for (const r of [router, first, second]) r.stop()
})

test('pack router: swarm members learnt by JOIN and peer exchange are in the answer at once, before any DHT record', async () => {
  // b is the seed everyone is connected to; a and c are not connected to each other.
  const [b, a, c] = await startNodes(3)
  const key = sha256(Buffer.from('joined, not provided'))
  const seen = new Map<string, SwarmMembers>()
  const peers = [a!, b!, c!]
  for (const node of peers) {
    const members = new SwarmMembers()
    seen.set(node.peerId.toString(), members)
    const server = new ChunkServer(node.libp2p, { local: new MemoryChunks(), members })
    await server.start()
    after(async () => await server.stop())
  }
  const clientOf = (node: PeerNode): ChunkClient => {
    const members = seen.get(node.peerId.toString())!
    const client = new ChunkClient(node.libp2p, { onMembers: (k, heard) => { for (const m of heard) members.add(k, peerIdFromString(m.id), m.addresses) } })
    after(() => client.close())
    return client
  }
  clientOf(a!).join(b!.peerId, [key], a!.multiaddrs())
  await waitFor('the seed to hear a', () => seen.get(b!.peerId.toString())!.of(key).length === 1 ? true : undefined)
  clientOf(c!).join(b!.peerId, [key], c!.multiaddrs())
  // c hears of a in the seed's answer; a hears of c in the seed's push.
  await waitFor('c to hear of a', () => seen.get(c!.peerId.toString())!.of(key).some(p => p.equals(a!.peerId)) ? true : undefined)
  await waitFor('a to hear of c', () => seen.get(a!.peerId.toString())!.of(key).some(p => p.equals(c!.peerId)) ? true : undefined)
  const router = new DhtPackRouter(c!.libp2p, { members: seen.get(c!.peerId.toString())! })
  after(() => router.stop())
  // Nobody provided the key in the DHT: a is there because c heard of it.
  assert.deepEqual(await collect(router.holders(key, { signal: AbortSignal.timeout(10_000) })), [a!.peerId.toString()])
})

test('pack router: announcing with no peers fails within its deadline, and the caller\'s signal is honoured', async () => {
  const lonely = await startNode()
  const router = new DhtPackRouter(lonely.libp2p, { provideTimeoutMs: 300, lookupTimeoutMs: 300 })
  const pack = sha256(Buffer.from('pack three'))
  await assert.rejects(router.announce(pack, { signal: AbortSignal.timeout(10_000) }), (err: unknown) => err instanceof AnnounceError && /no answer within 300 ms/.test(err.message))
  assert.equal(router.stats.provideFailures, 1)
  const reason = new Error('caller gave up')
  const controller = new AbortController()
  const pending = router.announce(pack, { signal: controller.signal })
  controller.abort(reason)
  await assert.rejects(pending, err => err === reason)
  assert.deepEqual(await collect(router.holders(pack, { signal: AbortSignal.timeout(5000) })), [])
  router.stop()
})
