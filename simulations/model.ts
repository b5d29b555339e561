/**
 * The discrete-event model:
 *
 *   node simulations/model.ts simulations/scenarios/NAME.json [--nodes N] [--out DIR] [--profile FILE] [--shared-cores N]
 *
 * Replays the scenario with simulated nodes, links and origin that drive the
 * real burst policy (src/p2p/rendezvous.ts); see lib/model-world.ts for what is
 * modelled and how. The workload is the profile a real lone run recorded (the
 * chunks it fetched, in order, and what it fetched to mount: --profile, or the
 * newest in results/sim for the same image and workload), or a synthetic image. Like a
 * real run, it runs a lone node, the scenario with peers and the no-peers
 * baseline, and writes results.json, summary.md and SVG charts to --out
 * (default results/sim/model-<scenario>-<nodes>-<timestamp>/).
 *
 * --shared-cores N puts every node on one N-core machine, as a real run on this
 * machine is, for comparing with one; by default each node has a core of its own.
 */
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { simulate, type ModelMode, type ModelRun } from './lib/model-world.ts'
import { loadProfile } from './lib/profile.ts'
import { writeReport } from './lib/report.ts'
import { loadScenario } from './lib/scenario.ts'

const REPO = resolve(import.meta.dirname, '..')
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { out: { type: 'string' }, nodes: { type: 'string' }, profile: { type: 'string' }, 'shared-cores': { type: 'string' } }
})
if (positionals.length !== 1) {
  process.stderr.write('usage: node simulations/model.ts simulations/scenarios/NAME.json [--nodes N] [--out DIR] [--profile FILE] [--shared-cores N]\n')
  process.exit(2)
}
const scenario = await loadScenario(positionals[0]!)
if (values.nodes !== undefined) scenario.nodes = Number(values.nodes)
if (values['shared-cores'] !== undefined) scenario.model.sharedCores = Number(values['shared-cores'])
const profile = await loadProfile(REPO, scenario, values.profile)
const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)
const out = resolve(values.out ?? join(REPO, 'results', 'sim', `model-${scenario.name}-${scenario.nodes}${scenario.model.sharedCores > 0 ? `-${scenario.model.sharedCores}cores` : ''}-${stamp}`))
const log = (line: string): void => { process.stderr.write(`model: ${line}\n`) }

const runs: Partial<Record<ModelMode, ModelRun>> = {}
for (const mode of ['lone', ...(scenario.peers ? ['peers'] as const : []), 'baseline'] as const) {
  const run = await simulate({ scenario, profile, mode })
  runs[mode] = run
  log(`${mode}: ${run.result.nodes.length} nodes, ${(run.result.wallMs / 1000).toFixed(1)} simulated s, ${run.events} events in ${run.seconds.toFixed(1)} s`)
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
    performance: Object.fromEntries(Object.entries(runs).map(([mode, r]) => [mode, { events: r.events, seconds: r.seconds, simulatedSeconds: r.result.wallMs / 1000 }]))
  }
})
for (const [name, x] of Object.entries(m)) {
  log(`${name}: ${x.ok}/${x.nodes} ok, p50 ${(x.completion.p50 / 1000).toFixed(2)} s, p99 ${(x.completion.p99 / 1000).toFixed(2)} s (${x.p99OverLone.toFixed(2)}x lone), origin ${(x.origin.bytes / 1e6).toFixed(1)} MB (${x.egressFactor.toFixed(2)}x lone, chunks ${x.chunkEgressFactor.toFixed(2)}x)`)
}
log(`wrote ${join(out, 'summary.md')}`)
