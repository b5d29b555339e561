import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { after, test } from 'node:test'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { ChunkServer } from '../../src/p2p/chunk-server.ts'
import { PeerChunkSource } from '../../src/p2p/peer-source.ts'
import { peerBudgetMs } from '../../src/p2p/peer-source-defaults.ts'
import { chunkKey, nodeKey, selectSources } from '../../src/p2p/rendezvous.ts'
import { TestSource, testResolver } from '../fetch/helpers.ts'
import { tempDir } from '../helpers/tmp.ts'
import { MemoryChunks, StaticRouter, makePack, startNodes } from './helpers.ts'

// Issue 14: the peer source's waits assumed the resolver's default 20 s chunk timeout. With a
// shorter one, a parent that keeps answering `pending` used the whole budget and the read failed
// without the origin ever being asked.
test('chunk timeout: a parent stuck at pending leaves the origin a try within a 10 s chunk timeout', async () => {
  const chunkTimeoutMs = 10_000
  const [child, parent] = await startNodes(2)
  const { chunks } = makePack(Array.from({ length: 16 }, () => 4096))
  const [childKey, parentKey] = [child!, parent!].map(n => nodeKey(n.peerId.toString()))
  // A chunk for which the parent outranks the child, so the child asks it to fetch.
  const chunk = chunks.find(c => selectSources({ key: chunkKey(c.ref.digest), self: childKey!, swarm: [parentKey!], holders: [], excluded: () => false, maxParents: 1, maxHolders: 0 }).parents.length === 1)!
  // The parent's own fetch never ends: its server answers `pending` for as long as we ask.
  const local = new MemoryChunks()
  local.fetch = async (_digest, signal) => await new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }))
  const server = new ChunkServer(parent!.libp2p, { local })
  await server.start()
  after(async () => await server.stop())

  const peers = new PeerChunkSource({
    self: child!.peerId,
    router: new StaticRouter([parent!.peerId]),
    client: new ChunkClient(child!.libp2p),
    bans: child!.bans,
    chunkTimeoutMs
  })
  const origin = new TestSource('origin', [{ ref: chunk.ref, data: chunk.bytes }])
  const { resolver } = await testResolver({ remote: [peers, origin], timeoutMs: chunkTimeoutMs })

  const started = performance.now()
  const bytes = await resolver.get(chunk.ref, { signal: AbortSignal.timeout(30_000) })
  const ms = performance.now() - started
  assert.ok(Buffer.from(bytes).equals(chunk.bytes))
  assert.equal(origin.calls, 1, 'the origin was asked')
  assert.ok(peers.stats.pending > 0, 'the parent answered pending')
  assert.ok(ms < chunkTimeoutMs, `served within the chunk timeout (${Math.round(ms)} ms)`)
})

test('chunk timeout: the peers\' budget is derived from it and leaves the origin its reserve', () => {
  assert.equal(peerBudgetMs(20_000), 18_000)
  assert.equal(peerBudgetMs(10_000), 8000)
  assert.throws(() => peerBudgetMs(2000), /chunk timeout of 2000 ms leaves the peers no time.*--chunk-timeout/)
})

test('chunk timeout: an agent whose chunk timeout leaves the peers no time is refused with what to do', async () => {
  const dir = await tempDir()
  const { code, stderr } = await new Promise<{ code: unknown, stderr: string }>(resolve => {
    execFile(SHOAL_BIN, ['agent', '--state', join(dir, 'state'), '--origin', dir, '--trust', join(dir, 'shoal.pub'), '--chunk-timeout', '2000'], { timeout: 30_000 }, (err, _stdout, stderr) => resolve({ code: err?.code, stderr }))
  })
  assert.equal(code, 2)
  assert.match(stderr, /^shoal: a chunk timeout of 2000 ms leaves the peers no time .*use --chunk-timeout 3000 or more, or --no-p2p\n$/)
})
