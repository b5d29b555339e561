/**
 * Peer layer benchmark, same process, same run:
 *  - chunk transfer throughput between two libp2p nodes (ChunkServer →
 *    ChunkClient: noise + yamux, one long-lived stream, batched WANTs), with and
 *    without a pre-shared key, against plain node:http keep-alive on loopback
 *    serving the same chunks. Both servers re-hash each chunk before sending (as
 *    ChunkServer always does); neither client verifies. Sender and receiver
 *    share this process's one JS thread, so the figures are a combined cost.
 *  - DHT: provide and findProviders latency across N nodes (default 10).
 *
 *   node benchmarks/p2p-throughput.ts [--mib 256] [--nodes 10] [--lookups 60]
 *
 * Prints JSON.
 */
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { Agent, createServer, request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { sha256, type Digest } from '../src/oci/digest.ts'
import { ChunkClient } from '../src/p2p/chunk-client.ts'
import { ChunkServer, type LocalChunks } from '../src/p2p/chunk-server.ts'
import { createPeerNode, generatePsk, type PeerNode } from '../src/p2p/node.ts'
import { DhtPackRouter, packCid } from '../src/p2p/pack-router.ts'

reportErrors('p2p-throughput')
const args = parseScriptArgs({
  script: 'p2p-throughput',
  usage: 'usage: node benchmarks/p2p-throughput.ts [--mib 256] [--nodes 10] [--lookups 60]',
  options: { mib: { type: 'string', default: '256' }, nodes: { type: 'string', default: '10' }, lookups: { type: 'string', default: '60' } }
})
const mib = args.number('mib', { min: 1 })
const totalBytes = mib * 1024 * 1024
const nodeCount = args.int('nodes', { min: 2 })
const lookupCount = args.int('lookups', { min: 1 })
const CONCURRENCY = 32
const HTTP_SOCKETS = 8

const stateRoot = await mkdtemp(join(tmpdir(), 'shoal-bench-p2p-'))
let stateDirs = 0
const startNode = async (options: { psk?: Uint8Array, bootstrap?: string[] } = {}): Promise<PeerNode> =>
  await createPeerNode({ stateDir: join(stateRoot, String(stateDirs++)), ...options })

function makeChunks (size: number): Array<{ digest: Digest, bytes: Uint8Array }> {
  return Array.from({ length: Math.max(1, Math.floor(totalBytes / size)) }, () => {
    const bytes = randomBytes(size)
    return { digest: sha256(bytes), bytes }
  })
}

/** Runs `fetchOne` over every chunk with CONCURRENCY workers; MB/s (10^6). */
async function throughput<T> (items: T[], fetchOne: (item: T) => Promise<number>): Promise<{ mbPerSecond: number, seconds: number }> {
  let next = 0
  let bytes = 0
  const started = performance.now()
  await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
    while (next < items.length) {
      const got = await fetchOne(items[next++]!) // not `bytes += await …`: that reads bytes before the await
      bytes += got
    }
  }))
  const seconds = (performance.now() - started) / 1000
  return { mbPerSecond: Math.round(bytes / seconds / 1e6), seconds: Math.round(seconds * 100) / 100 }
}

async function libp2pRun (size: number, psk?: Uint8Array): Promise<{ mbPerSecond: number, seconds: number, wantsPerFrame: number }> {
  const chunks = makeChunks(size)
  const byDigest = new Map(chunks.map(c => [c.digest, c.bytes]))
  const local: LocalChunks = { get: async digest => byDigest.get(digest), held: async () => [] }
  const serverNode = await startNode({ psk })
  const clientNode = await startNode({ psk, bootstrap: serverNode.multiaddrs() })
  const server = new ChunkServer(serverNode.libp2p, { local })
  await server.start()
  const client = new ChunkClient(clientNode.libp2p)
  const want = async (c: { digest: Digest, bytes: Uint8Array }): Promise<number> => {
    const reply = await client.want(serverNode.peerId, { digest: c.digest, length: c.bytes.length }, { fetch: false, waitMs: 0, signal: AbortSignal.timeout(60_000) })
    if (reply.status !== 'data') throw new Error(`unexpected ${reply.status}`)
    return reply.bytes.length
  }
  await want(chunks[0]!) // open the stream outside the measurement
  const result = await throughput(chunks, want)
  client.close()
  await server.stop()
  await Promise.all([clientNode.stop(), serverNode.stop()])
  return { ...result, wantsPerFrame: Math.round(client.stats.wants / client.stats.wantFrames * 10) / 10 }
}

async function httpRun (size: number): Promise<{ mbPerSecond: number, seconds: number }> {
  const chunks = makeChunks(size)
  const byHex = new Map(chunks.map(c => [c.digest.slice(7), c.bytes]))
  const server = createServer((req, res) => {
    const bytes = byHex.get(req.url!.slice(1))
    if (bytes === undefined || createHash('sha256').update(bytes).digest('hex') !== req.url!.slice(1)) {
      res.writeHead(404).end()
      return
    }
    res.writeHead(200, { 'Content-Length': bytes.length }).end(bytes)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  const agent = new Agent({ keepAlive: true, maxSockets: HTTP_SOCKETS })
  const get = async (c: { digest: Digest }): Promise<number> => await new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path: `/${c.digest.slice(7)}`, agent }, res => {
      const parts: Buffer[] = []
      res.on('data', (b: Buffer) => parts.push(b))
      res.on('end', () => resolve(Buffer.concat(parts).length))
      res.on('error', reject)
    }).on('error', reject).end()
  })
  await get(chunks[0]!)
  const result = await throughput(chunks, get)
  agent.destroy()
  await new Promise(resolve => server.close(resolve))
  return result
}

function percentiles (ms: number[]): { p50: number, p90: number, max: number } {
  const sorted = [...ms].sort((a, b) => a - b)
  const at = (q: number): number => Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!)
  return { p50: at(0.5), p90: at(0.9), max: Math.round(sorted[sorted.length - 1]!) }
}

async function dhtRun (): Promise<Record<string, unknown>> {
  const first = await startNode()
  const nodes = [first, ...await Promise.all(Array.from({ length: nodeCount - 1 }, async () => await startNode({ bootstrap: first.multiaddrs() })))]
  const routers = nodes.map(node => new DhtPackRouter(node.libp2p, { cacheTtlMs: 0 }))
  const packs = nodes.map((_, i) => sha256(Buffer.from(`bench pack ${i}`)))
  // Let identify and the first self-queries fill the routing tables before timing anything.
  await new Promise(resolve => setTimeout(resolve, 2000))
  const provideMs: number[] = []
  for (const [i, router] of routers.entries()) {
    const started = performance.now()
    await router.announce(packs[i]!, { signal: AbortSignal.timeout(30_000) })
    provideMs.push(performance.now() - started)
  }
  const firstMs: number[] = []
  const walkMs: number[] = []
  let misses = 0
  for (let n = 0; n < lookupCount; n++) {
    const asker = n % nodes.length
    const target = (asker + 1 + (n * 7) % (nodes.length - 1)) % nodes.length
    const started = performance.now()
    let first: number | undefined
    for await (const provider of nodes[asker]!.libp2p.contentRouting.findProviders(packCid(packs[target]!), { signal: AbortSignal.timeout(10_000) })) {
      if (provider.id.equals(nodes[target]!.peerId)) first ??= performance.now() - started
    }
    walkMs.push(performance.now() - started)
    if (first === undefined) misses++
    else firstMs.push(first)
  }
  for (const router of routers) router.stop()
  await Promise.all(nodes.map(async node => await node.stop()))
  return { nodes: nodeCount, provideMs: percentiles(provideMs), findProvidersFirstResultMs: percentiles(firstMs), findProvidersWalkMs: percentiles(walkMs), lookups: lookupCount, misses }
}

const psk = generatePsk()
const results: Record<string, unknown> = { node: process.version, totalMiB: mib, concurrency: CONCURRENCY, httpSockets: HTTP_SOCKETS, throughput: {} }
for (const [label, size] of [['1MiB', 1024 * 1024], ['256KiB', 256 * 1024], ['64KiB', 64 * 1024]] as const) {
  (results.throughput as Record<string, unknown>)[label] = {
    libp2p: await libp2pRun(size),
    libp2pPsk: await libp2pRun(size, psk),
    http: await httpRun(size)
  }
}
results.dht = await dhtRun()
await rm(stateRoot, { recursive: true, force: true })
process.stdout.write(JSON.stringify(results, null, 2) + '\n')
