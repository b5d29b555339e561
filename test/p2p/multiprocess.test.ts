import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { createInterface } from 'node:readline'
import { after, test } from 'node:test'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { generatePsk } from '../../src/p2p/node.ts'
import { DhtPackRouter } from '../../src/p2p/pack-router.ts'
import { PeerChunkSource } from '../../src/p2p/peer-source.ts'
import { tempDir } from '../helpers/tmp.ts'
import { StaticRouter, seededPack, startNode, waitFor } from './helpers.ts'

const FIXTURE = new URL('./fixtures/peer-process.ts', import.meta.url).pathname

interface PeerProcess { child: ChildProcess, peerId: string, multiaddrs: string[], gets: () => number }

/** Starts a peer in its own OS process and waits for its ready line; killed when the file's tests end. */
async function spawnPeer (config: { psk: Uint8Array, seed: string, count: number, size: number, delayMs?: number, bootstrap?: string[] }): Promise<PeerProcess> {
  const arg = { delayMs: 0, bootstrap: [], ...config, stateDir: await tempDir('shoal-p2p-proc-'), psk: Buffer.from(config.psk).toString('hex') }
  const child = spawn(process.execPath, [FIXTURE, JSON.stringify(arg)], { stdio: ['ignore', 'pipe', 'inherit'] })
  after(() => { child.kill('SIGKILL') })
  let gets = 0
  const ready = new Promise<{ peerId: string, multiaddrs: string[] }>((resolve, reject) => {
    child.once('exit', code => reject(new Error(`peer process exited early with ${code}`)))
    createInterface({ input: child.stdout! }).on('line', line => {
      const message = JSON.parse(line) as { peerId?: string, multiaddrs?: string[], get?: string }
      if (message.get !== undefined) gets++
      else resolve({ peerId: message.peerId!, multiaddrs: message.multiaddrs! })
    })
  })
  return { child, ...await ready, gets: () => gets }
}

test('multi-process: DHT discovery and verified chunk exchange with peers in two other OS processes', async () => {
  const psk = generatePsk()
  const spec = { psk, seed: 'multi-process pack', count: 24, size: 256 * 1024 }
  const first = await spawnPeer(spec)
  const second = await spawnPeer({ ...spec, bootstrap: first.multiaddrs })
  const node = await startNode({ psk, bootstrap: first.multiaddrs })
  const { pack, chunks } = seededPack(spec.seed, spec.count, spec.size)

  const router = new DhtPackRouter(node.libp2p, { cacheTtlMs: 200 })
  after(() => router.stop())
  await waitFor('both processes to show up as providers of the pack', async () => {
    const seen = new Set<string>()
    for await (const peer of router.holders(pack, { signal: AbortSignal.timeout(5000) })) seen.add(peer.toString())
    return seen.has(first.peerId) && seen.has(second.peerId) ? true : undefined
  }, 60_000)

  const peers = new PeerChunkSource({ self: node.peerId, router, client: new ChunkClient(node.libp2p), bans: node.bans })
  const got = await Promise.all(chunks.map(async c => await peers.get(c.ref, { signal: AbortSignal.timeout(30_000) })))
  for (const [i, bytes] of got.entries()) assert.ok(bytes !== undefined && Buffer.from(bytes).equals(chunks[i]!.bytes), `chunk ${i}`)
  assert.equal(peers.stats.hits, chunks.length)
  assert.equal(peers.stats.bytesFromPeers, spec.count * spec.size)
  assert.deepEqual(new Set(peers.stats.perPeerBytes.keys()), new Set([first.peerId, second.peerId]), 'both processes served a share')
})

test('multi-process: a peer process killed with SIGKILL mid-request does not hang the requester', async () => {
  const psk = generatePsk()
  const spec = { psk, seed: 'doomed pack', count: 2, size: 1024 * 1024, delayMs: 60_000 }
  const doomed = await spawnPeer(spec)
  const node = await startNode({ psk, bootstrap: doomed.multiaddrs })
  const { chunks } = seededPack(spec.seed, spec.count, spec.size)
  const doomedId = node.connectedPeers().find(p => p.toString() === doomed.peerId)!
  // Deadlines far beyond the test: only the death can end this request.
  const peers = new PeerChunkSource({
    self: node.peerId, router: new StaticRouter([doomedId]), client: new ChunkClient(node.libp2p), bans: node.bans,
    peerTimeoutMs: 120_000, parentWaitMs: 60_000, hedgeDelayMs: 120_000, maxWaitMs: 300_000
  })
  const pending = peers.get(chunks[0]!.ref, { signal: AbortSignal.timeout(300_000) })
  await waitFor('the peer process to start on the request', () => doomed.gets() >= 1 ? true : undefined)
  doomed.child.kill('SIGKILL')
  assert.equal(await pending, undefined, 'no bytes, no hang: the resolver goes to the origin')
  assert.equal(peers.stats.misses, 1)
})
