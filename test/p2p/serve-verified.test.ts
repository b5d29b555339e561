import assert from 'node:assert/strict'
import { join } from 'node:path'
import { after, test } from 'node:test'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { MemoryCache } from '../../src/cache/memory-cache.ts'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { digestHex, type Digest } from '../../src/oci/digest.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { ChunkServer } from '../../src/p2p/chunk-server.ts'
import { NodeChunks, resolverStore, type ChunkLocator } from '../../src/p2p/local-chunks.ts'
import type { PeerNode } from '../../src/p2p/node.ts'
import { flipBits } from '../cache/damage-helpers.ts'
import { tempDir } from '../helpers/tmp.ts'
import { MemoryChunks, makePack, startNodes, type TestChunk } from './helpers.ts'

/**
 * Issue 14, verified once per trust boundary: the chunk server hashes only held
 * bytes this process has not verified yet (a disk chunk left by an earlier run),
 * once, and tells the disk cache; what it verified already (memory cache, disk
 * entries it wrote or hashed, fetches) goes out as it is: the requester hashes
 * what it receives anyway.
 */

const holder = { fetch: false, waitMs: 0 }
const signal = (): AbortSignal => AbortSignal.timeout(20_000)

async function serve (node: PeerNode, local: ConstructorParameters<typeof ChunkServer>[1]['local']): Promise<ChunkServer> {
  const server = new ChunkServer(node.libp2p, { local })
  await server.start()
  after(async () => await server.stop())
  return server
}

/** A client closed when the file's tests end, pass or fail. */
function clientOf (node: PeerNode): ChunkClient {
  const client = new ChunkClient(node.libp2p)
  after(() => { client.close() })
  return client
}

function locator (chunks: TestChunk[]): ChunkLocator {
  const refs = new Map<Digest, ChunkRef>(chunks.map(c => [c.ref.digest, c.ref]))
  return { locate: d => refs.get(d), locateSoon: async d => refs.get(d), packChunks: p => chunks.filter(c => c.ref.pack === p).map(c => c.ref) }
}

/**
 * The agent's serving path (NodeChunks over resolverStore) over a disk cache
 * reopened as a new process would: OLD was stored by an earlier run (DAMAGED
 * too, then a byte of it flipped on disk), WRITTEN by this one, IN_MEMORY sits
 * in the memory cache only.
 */
async function agentServer (node: PeerNode): Promise<{ server: ChunkServer, disk: DiskCache, chunks: Record<'old' | 'damaged' | 'written' | 'inMemory', TestChunk> }> {
  const { chunks: list } = makePack(Array.from({ length: 4 }, () => 64 * 1024))
  const [old, damaged, written, inMemory] = list as [TestChunk, TestChunk, TestChunk, TestChunk]
  const dir = join(await tempDir(), 'cache')
  const before = await DiskCache.open({ dir, maxBytes: 1 << 30 })
  await before.put(old.ref.digest, old.bytes)
  await before.put(damaged.ref.digest, damaged.bytes)
  const at = before.chunkLocation(digestHex(damaged.ref.digest))!
  await before.close()
  await flipBits(at.path, at.offset + 1000)
  const disk = await DiskCache.open({ dir, maxBytes: 1 << 30 })
  after(async () => await disk.close())
  await disk.put(written.ref.digest, written.bytes)
  const memory = new MemoryCache()
  memory.set(inMemory.ref.digest, inMemory.bytes)
  const resolver = { memory, get: async (): Promise<never> => { throw new Error('no fetches here') } }
  const local = new NodeChunks({ locator: locator(list), store: resolverStore(resolver, disk) })
  return { server: await serve(node, local), disk, chunks: { old, damaged, written, inMemory } }
}

test('serving: chunks this process verified (memory cache, a disk entry it wrote) are sent without being hashed again', async () => {
  const [a, b] = await startNodes(2)
  const { server, disk, chunks } = await agentServer(b!)
  const client = clientOf(a!)
  for (const c of [chunks.inMemory, chunks.written]) {
    const reply = await client.want(b!.peerId, c.ref, { ...holder, signal: signal() })
    assert.ok(reply.status === 'data' && Buffer.from(reply.bytes).equals(c.bytes), 'byte-exact')
  }
  assert.equal(server.stats.served, 2)
  assert.equal(server.stats.hashedBeforeServing, 0, 'nothing hashed')
  assert.equal(disk.stats.verifiedOnFirstUse, 0)
})

test('serving: a disk chunk from an earlier run is hashed once, before its first sending, then marked verified in the disk cache', async () => {
  // The server first: the others bootstrap to it, so both are connected to it (no DHT lookup to dial it).
  const [b, a, c] = await startNodes(3)
  const { server, disk, chunks } = await agentServer(b!)
  assert.equal(disk.isVerified(chunks.old.ref.digest), false, 'precondition: found on disk at startup')
  const first = clientOf(a!)
  const reply = await first.want(b!.peerId, chunks.old.ref, { ...holder, signal: signal() })
  assert.ok(reply.status === 'data' && Buffer.from(reply.bytes).equals(chunks.old.bytes), 'byte-exact')
  assert.equal(server.stats.hashedBeforeServing, 1)
  assert.equal(disk.isVerified(chunks.old.ref.digest), true, 'the disk cache was told')
  assert.equal(disk.stats.verifiedOnFirstUse, 1)
  // Another peer, and the first again: sent as they are now.
  const second = clientOf(c!)
  for (const client of [second, first]) {
    const again = await client.want(b!.peerId, chunks.old.ref, { ...holder, signal: signal() })
    assert.ok(again.status === 'data' && Buffer.from(again.bytes).equals(chunks.old.bytes))
  }
  assert.equal(server.stats.served, 3)
  assert.equal(server.stats.hashedBeforeServing, 1, 'hashed once, not once per request')
  assert.equal(disk.stats.verifiedOnFirstUse, 1)
})

test('serving: a damaged disk chunk from an earlier run is answered dont-have, never sent, and not marked verified', async () => {
  const [a, b] = await startNodes(2)
  const { server, disk, chunks } = await agentServer(b!)
  const client = clientOf(a!)
  for (let i = 1; i <= 2; i++) {
    // The status alone: a failing deepEqual of a 64 KiB reply spends minutes on its diff.
    assert.equal((await client.want(b!.peerId, chunks.damaged.ref, { ...holder, signal: signal() })).status, 'dont-have')
    // Still unverified, so hashed again each time (what becomes of the file is the resolver's business, on its own read).
    assert.equal(server.stats.hashedBeforeServing, i)
    assert.equal(server.stats.localCorruption, i)
  }
  assert.equal(server.stats.served, 0)
  assert.equal(server.stats.bytesServed, 0, 'no byte of it went out')
  assert.equal(disk.isVerified(chunks.damaged.ref.digest), false)
  assert.equal(disk.stats.verifiedOnFirstUse, 0)
  // The good neighbour from the same run is unaffected.
  const good = await client.want(b!.peerId, chunks.old.ref, { ...holder, signal: signal() })
  assert.ok(good.status === 'data' && Buffer.from(good.bytes).equals(chunks.old.bytes))
})

test('serving: bytes said to be verified go out as they are (the server does not hash them: the requester does); unverified ones are checked', async () => {
  const [a, b] = await startNodes(2)
  const { chunks } = makePack([4096, 4096])
  // Both hold wrong bytes. Nothing real says verified of wrong bytes; here it shows that no hash ran.
  const lie = (c: TestChunk): TestChunk => ({ ref: c.ref, bytes: Buffer.from(c.bytes).fill(7, 100, 200) })
  const local = new MemoryChunks().add(lie(chunks[0]!), lie(chunks[1]!))
  local.unverified.add(chunks[1]!.ref.digest)
  const server = await serve(b!, local)
  const client = clientOf(a!)
  const trusted = await client.want(b!.peerId, chunks[0]!.ref, { ...holder, signal: signal() })
  assert.equal(trusted.status, 'data')
  assert.equal((await client.want(b!.peerId, chunks[1]!.ref, { ...holder, signal: signal() })).status, 'dont-have')
  assert.equal(server.stats.hashedBeforeServing, 1)
  assert.equal(server.stats.localCorruption, 1)
  assert.deepEqual(local.marked, [], 'a failed hash marks nothing')
})
