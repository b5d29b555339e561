import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { makeCpu } from '../../simulations/lib/cpu.ts'
import { EventQueue, Simulator } from '../../simulations/lib/des.ts'
import { Link, Transfer } from '../../simulations/lib/links.ts'
import { simulate, type ModelMode, type PolicyDiagnostics } from '../../simulations/lib/model-world.ts'
import { syntheticProfile } from '../../simulations/lib/profile.ts'
import { writeReport } from '../../simulations/lib/report.ts'
import { parseScenario, type Scenario } from '../../simulations/lib/scenario.ts'
import { MOUNT_FETCH_DEFAULTS } from '../../src/agent/constants.ts'
import { RESOLVER_DEFAULTS } from '../../src/fetch/constants.ts'
import { RETRY_DEFAULTS } from '../../src/http/http-retry.ts'
import { CHUNK_SERVER_DEFAULTS } from '../../src/p2p/chunk-server.ts'
import { SERVING_DEFAULTS } from '../../src/p2p/local-chunks.ts'
import { PACK_ROUTER_DEFAULTS } from '../../src/p2p/pack-router.ts'
import { PEER_SOURCE_DEFAULTS } from '../../src/p2p/peer-source-defaults.ts'
import { PEER_EXCHANGE } from '../../src/p2p/swarm-members.ts'
import { tempDir } from '../helpers/tmp.ts'

/** A 20 MB image of 1 MiB chunks: small enough for hundreds of nodes in a second or two. */
const profile = syntheticProfile({ gigabytes: 0.02, layers: 2 })
const uniquePackBytes = profile.chunks.reduce((a, c) => a + c.storedLength, 0)

function scenario (overrides: Record<string, unknown>): Scenario {
  return parseScenario({ nodes: 200, links: { mbit: 1000, latencyMs: 0.2 }, origin: { mbit: 2000, latencyMs: 1 }, model: { workloadCpuMs: 200 }, ...overrides }, 'test')
}

async function run (s: Scenario, mode: ModelMode): Promise<Awaited<ReturnType<typeof simulate>>['result']> {
  return (await simulate({ scenario: s, profile, mode })).result
}

async function diagnose (s: Scenario): Promise<PolicyDiagnostics> {
  const { diagnostics } = await simulate({ scenario: s, profile, mode: 'peers' })
  assert.ok(diagnostics !== undefined)
  return diagnostics
}

describe('model: discrete-event core', () => {
  it('the event queue pops by time, and same-time events in insertion order', () => {
    const q = new EventQueue()
    const times = Array.from({ length: 500 }, (_, i) => (i * 7919) % 97)
    const seen: Array<[number, number]> = []
    times.forEach((t, i) => q.push(t, () => seen.push([t, i])))
    while (q.size > 0) q.pop()!.fn()
    for (let i = 1; i < seen.length; i++) {
      const [t0, i0] = seen[i - 1]!
      const [t1, i1] = seen[i]!
      assert.ok(t0 < t1 || (t0 === t1 && i0 < i1), `event ${i} out of order`)
    }
  })

  it('two transfers share a link equally, and one held up by a slow receiver leaves the rest to the other', async () => {
    const sim = new Simulator()
    const sender = new Link(sim, 'sender', 10e6)
    const fast = new Link(sim, 'fast', 100e6)
    const slow = new Link(sim, 'slow', 2e6)
    const done: Record<string, number> = {}
    const a = new Transfer(sim, sender, fast, 8e6, { latencyMs: 0, pieceBytes: 65536 })
    const b = new Transfer(sim, sender, slow, 4e6, { latencyMs: 0, pieceBytes: 65536 })
    void a.done.then(() => { done.a = sim.now })
    void b.done.then(() => { done.b = sim.now })
    await sim.run()
    // b is held to 2 MB/s by its receiver (2 s); a gets the other 8 MB/s of the sender: 8 MB in about 1 s, not 1.6 s.
    assert.ok(Math.abs(done.b! - 2000) < 100, `slow transfer took ${done.b} ms`)
    assert.ok(done.a! < 1150, `fast transfer took ${done.a} ms, so the sender did not give it the capacity the slow one could not use`)
  })

  it('shared cores run four 100 ms jobs on two cores in 200 ms', async () => {
    const sim = new Simulator()
    const cpu = makeCpu(sim, 2)
    const ends: number[] = []
    for (let i = 0; i < 4; i++) void cpu.work(100).then(() => ends.push(sim.now))
    await sim.run()
    assert.deepEqual(ends.map(t => Math.round(t)), [200, 200, 200, 200])
  })
})

describe('model: 200 nodes, each running the real PeerChunkSource', () => {
  it('with peers, every node finishes within the bound and the origin sends fewer bytes than without', async () => {
    const s = scenario({})
    const peers = await run(s, 'peers')
    const baseline = await run(s, 'baseline')
    for (const r of [peers, baseline]) {
      assert.equal(r.nodes.length, 200)
      assert.ok(r.nodes.every(n => n.outcome === 'ok'), JSON.stringify(r.nodes.find(n => n.outcome !== 'ok')))
      assert.ok(r.nodes.every(n => n.completionMs! <= s.timeouts.runMs))
    }
    assert.ok(peers.origin.bytesSent < baseline.origin.bytesSent, `peers ${peers.origin.bytesSent} vs baseline ${baseline.origin.bytesSent}`)
    assert.equal(baseline.origin.packBytes, 200 * uniquePackBytes, 'without peers every node pulls every chunk itself')
  })

  it('once the swarm is known (arrivals 1 s apart), each chunk leaves the origin about once: its root fetches it, everyone else gets it down the tree', async () => {
    const peers = await run(scenario({ nodes: 50, arrival: { type: 'staggered', intervalMs: 1000 } }), 'peers')
    assert.ok(peers.nodes.every(n => n.outcome === 'ok'))
    assert.ok(peers.origin.packBytes <= 1.1 * uniquePackBytes, `origin sent ${peers.origin.packBytes} pack bytes for ${uniquePackBytes} unique`)
    const uploaders = peers.nodes.filter(n => n.uploadBytes > 0).length
    assert.ok(uploaders > 10, `only ${uploaders} nodes uploaded: the load is not spread`)
  })

  it('chunks travel down distribution trees: parents fetch for their children, and most copies are more than one hop from the origin', async () => {
    const d = await diagnose(scenario({}))
    assert.ok(d.source.parentRequests > 0 && d.server.parentRequests > 0, JSON.stringify(d.source))
    const h = d.depth.histogram
    const total = h.reduce((a, n) => a + n, 0)
    assert.ok(total > 0 && (h[1] ?? 0) < total / 2, `depths ${JSON.stringify(h)}`)
    assert.ok(d.depth.max >= 3, `depths ${JSON.stringify(h)}`)
  })

  it('once a swarm\'s first walk is done, reads get the last answer at once while a stale one is refreshed (DhtPackRouter\'s stale-while-revalidate)', async () => {
    const d = await diagnose(scenario({ nodes: 30, model: { workloadCpuMs: 200, lookupCacheMs: 100 } }))
    assert.ok(d.dht.staleAnswers > 0, JSON.stringify(d.dht))
    assert.ok(d.dht.walks > 30 * 3, `${d.dht.walks} walks: each node walks each key it uses more than once`)
  })

  it('kill -9 of 30 % mid-burst: the killed are reported as such, every other node finishes', async () => {
    const r = await run(scenario({ faults: { kill: { share: 0.3, atMs: 300 } } }), 'peers')
    assert.equal(r.nodes.filter(n => n.outcome === 'killed').length, 60)
    assert.ok(r.nodes.filter(n => n.outcome !== 'killed').every(n => n.outcome === 'ok'))
  })

  it('bad peers are caught by the hash check and banned; every honest node finishes', async () => {
    const r = await run(scenario({ faults: { badPeers: { share: 0.1 } } }), 'peers')
    assert.ok(r.nodes.every(n => n.outcome === 'ok'))
    assert.ok(r.nodes.reduce((a, n) => a + n.verificationFailures, 0) > 0)
    assert.ok(r.nodes.some(n => n.bannedPeers > 0))
  })

  it('an origin outage longer than the retries makes reads that need the origin fail, cleanly and within the bound', async () => {
    const s = scenario({ nodes: 20, faults: { originOutage: { fromMs: 0, toMs: 60_000 } } })
    const r = await run(s, 'baseline')
    assert.ok(r.nodes.every(n => n.outcome === 'failed' && n.completionMs! < s.timeouts.runMs), JSON.stringify(r.nodes[0]))
  })

  it('an origin attempt that keeps receiving bytes is not cut off after 10 s: 20 nodes share an 8 Mbit/s origin for minutes, with no retries', async () => {
    const s = scenario({ nodes: 20, origin: { mbit: 8, latencyMs: 1 }, timeouts: { chunkMs: 600_000, runMs: 900_000 } })
    const r = await run(s, 'baseline')
    assert.ok(r.nodes.every(n => n.outcome === 'ok'), JSON.stringify(r.nodes.find(n => n.outcome !== 'ok')))
    assert.ok(Math.max(...r.nodes.map(n => n.completionMs!)) > 60_000)
    const fetches = 20 * (profile.chunks.length + profile.catalogs.length + profile.metadata.requests)
    assert.equal(r.origin.requests, fetches, 'every fetch took exactly one attempt')
  })

  it('against a registry, tag lookups are two HEADs without bytes; against an OCI layout, the index.json reads the profile recorded', async () => {
    // As a lone agent recorded it before HttpOrigin reused index.json reads: two reads, then four blobs.
    const recorded = { ...profile, metadata: { bytes: 6000, requests: 6 } }
    const origin = async (kind: string): Promise<{ requests: number, metadataBytes: number }> =>
      (await simulate({ scenario: scenario({ nodes: 5, origin: { mbit: 2000, latencyMs: 1, kind } }), profile: recorded, mode: 'baseline' })).result.origin
    const layout = await origin('oci-layout')
    const registry = await origin('registry')
    assert.equal(registry.requests, layout.requests)
    assert.equal(layout.metadataBytes - registry.metadataBytes, 5 * 2 * 1000)
  })

  it('writes results.json, summary.md and charts that parse', async () => {
    const s = scenario({ nodes: 30 })
    const dir = await tempDir('shoal-sim-report-')
    const m = await writeReport(dir, { kind: 'model', scenario: s, date: 'today', command: 'test', lone: await run(s, 'lone'), runs: { peers: await run(s, 'peers'), baseline: await run(s, 'baseline') }, extra: {} })
    assert.ok(m.peers!.egressFactor < m.baseline!.egressFactor)
    const results = JSON.parse(await readFile(join(dir, 'results.json'), 'utf8')) as { metrics: Record<string, unknown> }
    assert.deepEqual(Object.keys(results.metrics), ['peers', 'baseline'])
    assert.match(await readFile(join(dir, 'summary.md'), 'utf8'), /origin egress factor/)
    for (const chart of ['completion-cdf.svg', 'origin-egress.svg', 'bytes-by-source-peers.svg', 'bytes-by-source-baseline.svg']) {
      assert.match(await readFile(join(dir, chart), 'utf8'), /^<svg [^>]*>[\s\S]*<\/svg>\n$/)
    }
  })
})

describe('model: the agent\'s code, not a copy of it', () => {
  const code = async (): Promise<string> => {
    const source = await readFile(join(import.meta.dirname, '..', '..', 'simulations', 'lib', 'model-world.ts'), 'utf8')
    return source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|\s)\/\/.*$/gm, '$1')
  }

  it('each node assembles src\'s resolver, serving policy, HTTP retries, server admission and peer source', async () => {
    const c = await code()
    for (const part of ['new ChunkResolver(', 'new NodeChunks(', 'new RetryingRequests(', 'admitWant(', 'new PeerChunkSource(']) assert.ok(c.includes(part), part)
  })

  it('restates none of src\'s numbers: no literal in its code equals a default of the parts it models', async () => {
    const numbers = (o: unknown): number[] => typeof o === 'number' ? [o] : typeof o === 'object' && o !== null ? Object.values(o).flatMap(numbers) : []
    // From 100 up, and not 1,000 or 10,000: those are also the model's ms-to-s conversions, its upkeep tick and its (wall-clock) progress interval.
    const defaults = new Set([RESOLVER_DEFAULTS, RETRY_DEFAULTS, CHUNK_SERVER_DEFAULTS, SERVING_DEFAULTS, PACK_ROUTER_DEFAULTS, PEER_SOURCE_DEFAULTS, PEER_EXCHANGE, MOUNT_FETCH_DEFAULTS].flatMap(numbers).filter(n => n >= 100 && n !== 1000 && n !== 10_000))
    const literals = [...(await code()).matchAll(/(?<![\w.])\d[\d_]*(?:\.\d+)?(?![\w.])/g)].map(m => Number(m[0].replaceAll('_', '')))
    assert.deepEqual(literals.filter(n => defaults.has(n)), [])
  })
})

