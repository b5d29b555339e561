/**
 * The discrete-event model:
 *
 *   node simulations/model.ts simulations/scenarios/NAME.json [--nodes N] [--out DIR] [--profile FILE] [--shared-cores N]
 *
 * Replays the scenario with simulated nodes, links and origin; every node runs
 * the agent's real peer source (src/p2p/peer-source.ts, with the burst policy of
 * src/p2p/rendezvous.ts); see lib/model-world.ts for what is modelled and how. The workload is the profile a real lone run recorded (the
 * chunks it fetched, in order, and what it fetched to mount: --profile, or the
 * newest in results/sim for the same image and workload, recorded by a real lone
 * run when there is none), or a synthetic image. Like a
 * real run, it runs a lone node, the scenario with peers and the no-peers
 * baseline, and writes results.json, summary.md and SVG charts to --out
 * (default results/sim/model-<scenario>-<nodes>-<timestamp>/).
 *
 * --shared-cores N puts every node on one N-core machine, as a real run on this
 * machine is, for comparing with one; by default each node has a core of its own.
 */
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { totalmem } from 'node:os'
import { join, resolve } from 'node:path'
import { getHeapStatistics } from 'node:v8'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { POLICY_SETTINGS, simulate, type ModelMode, type ModelRun } from './lib/model-world.ts'
import { loadProfile } from './lib/profile.ts'
import { writeReport } from './lib/report.ts'
import { loadScenario } from './lib/scenario.ts'

const REPO = resolve(import.meta.dirname, '..')
reportErrors('model')
const { values, positionals, int } = parseScriptArgs({
  script: 'model',
  usage: 'usage: node simulations/model.ts simulations/scenarios/NAME.json [--nodes N] [--out DIR] [--profile FILE] [--shared-cores N]',
  options: { out: { type: 'string' }, nodes: { type: 'string' }, profile: { type: 'string' }, 'shared-cores': { type: 'string' } },
  positionals: 1
})
const nodes = int('nodes', { min: 1, max: 100_000 })
const sharedCores = int('shared-cores', { min: 0 })
// Read (and checked) before anything else: a wrong path or field ends the command here, not in the large-heap run.
const scenario = await loadScenario(positionals[0]!)

// Every simulated node keeps what the agent keeps (its swarm members, up to 1,024 per swarm
// key, its peer source's state): 10,000 nodes need more than V8's default heap (about 4 GB).
// Run again with three quarters of the machine's memory, unless the caller chose a size.
const HEAP_MB = Math.floor(totalmem() * 0.75 / 2 ** 20)
if (getHeapStatistics().heap_size_limit < HEAP_MB * 2 ** 20 * 0.9 && !process.execArgv.some(a => a.startsWith('--max-old-space-size')) && !(process.env.NODE_OPTIONS ?? '').includes('--max-old-space-size')) {
  const child = spawn(process.execPath, [...process.execArgv, `--max-old-space-size=${HEAP_MB}`, ...process.argv.slice(1)], { stdio: 'inherit' })
  // A stop sent to this process is meant for the run: without this, SIGTERM left the run going.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => child.kill(signal))
  const [code] = await once(child, 'exit') as [number | null]
  process.exit(code ?? 1)
}
// Stopped (Ctrl-C, SIGTERM): exit at once, but normally, so that a `--cpu-prof` profile of a long run is still written.
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    process.stderr.write(`model: stopped by ${signal}; no report written\n`)
    process.exit(130)
  })
}
if (nodes !== undefined) scenario.nodes = nodes
if (sharedCores !== undefined) scenario.model.sharedCores = sharedCores
const profile = await loadProfile(REPO, scenario, {
  file: values.profile,
  // None recorded yet for this image and workload (a fresh clone): a real lone run records one.
  record: async out => {
    process.stderr.write(`model: no workload profile recorded for ${scenario.name}'s image and workload yet: recording one with a real lone run (node simulations/run.ts ${positionals[0]} --profile-only), about 20 s\n`)
    const run = spawnSync(process.execPath, [join(REPO, 'simulations', 'run.ts'), positionals[0]!, '--profile-only', '--out', out], { stdio: 'inherit', timeout: 600_000 })
    if (run.status !== 0) throw new Error(`recording the workload profile failed (exit ${run.status ?? run.signal}); run node simulations/run.ts ${positionals[0]} --profile-only to see why, or pass --profile FILE`)
  }
})
const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)
const out = resolve(values.out ?? join(REPO, 'results', 'sim', `model-${scenario.name}-${scenario.nodes}${scenario.model.sharedCores > 0 ? `-${scenario.model.sharedCores}cores` : ''}-${stamp}`))
const log = (line: string): void => { process.stderr.write(`model: ${line}\n`) }

const runs: Partial<Record<ModelMode, ModelRun>> = {}
for (const mode of ['lone', ...(scenario.peers ? ['peers'] as const : []), 'baseline'] as const) {
  const run = await simulate({
    scenario,
    profile,
    mode,
    onProgress: p => log(`${mode}: ${(p.simulatedMs / 1000).toFixed(1)} simulated s, ${p.finished}/${p.nodes} nodes done, ${p.events} events in ${p.wallSeconds.toFixed(0)} s`)
  })
  runs[mode] = run
  log(`${mode}: ${run.result.nodes.length} nodes, ${(run.result.wallMs / 1000).toFixed(1)} simulated s, ${run.events} events in ${run.seconds.toFixed(1)} s`)
  const d = run.diagnostics
  if (d !== undefined) {
    log(`${mode}: policy: ${d.source.parentRequests} parent requests (${d.source.pending} pending, ${d.server.dontHave} dont-have: ${d.server.dontHaveNotVouched} not vouched yet, ${d.server.fetchLimit} over the fetch limit), ` +
      `tree depth mean ${d.depth.mean.toFixed(1)} max ${d.depth.max}; origin chunks: ${d.originChunks.noParentAsked} by roots, ${d.originChunks.parentsFailed} after parents failed; ` +
      `origin blobs: ${d.originBlobs.noParentAsked} + ${d.originBlobs.parentsFailed}; peer get p50/p99 ${d.peerGetMs.hitP50.toFixed(0)}/${d.peerGetMs.hitP99.toFixed(0)} ms`)
  }
}
const m = await writeReport(out, {
  kind: 'model',
  scenario,
  date: new Date().toISOString(),
  command: `node simulations/model.ts ${process.argv.slice(2).join(' ')}`,
  lone: runs.lone!.result,
  runs: { ...(runs.peers !== undefined ? { peers: runs.peers.result } : {}), baseline: runs.baseline!.result },
  extra: {
    profile: { image: profile.image, chunks: profile.chunks.length, chunkBytes: profile.chunks.reduce((a, c) => a + c.length, 0), catalogs: profile.catalogs, metadata: profile.metadata, lone: profile.lone },
    performance: Object.fromEntries(Object.entries(runs).map(([mode, r]) => [mode, { events: r.events, seconds: r.seconds, simulatedSeconds: r.result.wallMs / 1000, heapMB: r.heapMB }])),
    policy: { settings: POLICY_SETTINGS, ...(runs.peers?.diagnostics !== undefined ? { diagnostics: runs.peers.diagnostics } : {}) }
  }
})
for (const [name, x] of Object.entries(m)) {
  log(`${name}: ${x.ok}/${x.nodes} ok, p50 ${(x.completion.p50 / 1000).toFixed(2)} s, p99 ${(x.completion.p99 / 1000).toFixed(2)} s (${x.p99OverLone.toFixed(2)}x lone), origin ${(x.origin.bytes / 1e6).toFixed(1)} MB (${x.egressFactor.toFixed(2)}x lone, chunks ${x.chunkEgressFactor.toFixed(2)}x)`)
}
log(`wrote ${join(out, 'summary.md')}`)
