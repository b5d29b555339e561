/**
 * Calibrates the model against real runs:
 *
 *   node simulations/calibrate.ts RESULTS_DIR... [--fit] [--out DIR]
 *
 * Each RESULTS_DIR is the output of a real run (run.ts). The model replays the
 * same scenario, node count and recorded workload profile, with the real run's
 * machine as shared CPU (every agent, FUSE and workload of a real run share its
 * cores), and reports its error on origin bytes and on p50/p99 completion, for
 * the peers run and the baseline. With --fit it first searches a grid of the
 * parameters the real runs cannot measure directly (DHT lookup, announce and
 * per-RPC costs, libp2p upkeep, per-request overhead, CPU per MB moved, reads in flight) for
 * the smallest mean error over both runs, and reports with the best ones.
 * Several real runs of one size (they vary) each count. Writes calibration.json and
 * calibration.md to --out (default results/sim/calibration-<timestamp>/).
 */
import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { readJsonFile, reportErrors } from '../scripts/lib/errors.ts'
import { UsageError } from '../src/errors.ts'
import type { WorkloadProfile } from './lib/image.ts'
import { simulate } from './lib/model-world.ts'
import { loneReference, metrics, type RunMetrics } from './lib/report.ts'
import { DEFAULT_MODEL, type ModelParams, type Scenario } from './lib/scenario.ts'

interface RealRun { dir: string, scenario: Scenario, profile: WorkloadProfile, cores: number, lone: number, metrics: Record<'peers' | 'baseline', RunMetrics> }
interface Comparison { dir: string, nodes: number, run: 'lone' | 'peers' | 'baseline', metric: 'originBytes' | 'p50' | 'p99', real: number, model: number, error: number }
interface ModelMetrics { lone: number, peers: RunMetrics, baseline: RunMetrics }

const GRID: Partial<Record<keyof ModelParams, number[]>> = {
  lookupMs: [50, 100],
  announceMs: [50, 100],
  dhtRpcMs: [5, 10],
  requestOverheadMs: [5, 10],
  cpuMsPerMB: [10, 30],
  upkeepMsPerPeer: [0, 1, 2, 4, 8],
  readWindow: [1]
}

const REPO = resolve(import.meta.dirname, '..')
reportErrors('calibrate')
const { values, positionals } = parseScriptArgs({
  script: 'calibrate',
  usage: 'usage: node simulations/calibrate.ts RESULTS_DIR... [--fit] [--out DIR]',
  options: { fit: { type: 'boolean' }, out: { type: 'string' } },
  positionals: { min: 1 }
})
const reals = await Promise.all(positionals.map(loadRealRun))
const log = (line: string): void => { process.stderr.write(`calibrate: ${line}\n`) }

let params: Partial<ModelParams> = {}
let searched: Array<{ params: Partial<ModelParams>, error: number }> = []
if (values.fit === true) {
  searched = await fit(reals)
  params = searched[0]!.params
  log(`best of ${searched.length}: ${JSON.stringify(params)}, mean error ${(searched[0]!.error * 100).toFixed(1)} %`)
}
const comparisons = (await Promise.all(reals.map(async r => await compare(r, params)))).flat()
const out = resolve(values.out ?? join(REPO, 'results', 'sim', `calibration-${new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)}`))
await mkdir(out, { recursive: true })
await writeFile(join(out, 'calibration.json'), JSON.stringify({ date: new Date().toISOString(), runs: positionals, params, comparisons, searched: searched.slice(0, 20) }, null, 1) + '\n')
const table = [
  '| real run | nodes | run | metric | real | model | error |',
  '|---|---|---|---|---|---|---|',
  ...comparisons.map(c => `| ${c.dir.split('/').pop()} | ${c.nodes} | ${c.run} | ${c.metric} | ${show(c.metric, c.real)} | ${show(c.metric, c.model)} | ${(c.error * 100).toFixed(1)} % |`)
].join('\n')
await writeFile(join(out, 'calibration.md'), `# Model calibration (${new Date().toISOString()})\n\nCommand: \`node simulations/calibrate.ts ${process.argv.slice(2).join(' ')}\`\n\nParameters: \`${JSON.stringify(params)}\` (others as in the scenario)\n\n${table}\n`)
process.stdout.write(table + '\n')
log(`wrote ${join(out, 'calibration.md')}`)

/** A real run's output directory; a UsageError that says what to give when DIR is not one. */
async function loadRealRun (dir: string): Promise<RealRun> {
  const runs = 'node simulations/run.ts simulations/scenarios/NAME.json writes one to results/sim/NAME-NODES-TIME/'
  if (!existsSync(dir)) throw new UsageError(`results directory ${dir} does not exist: give the output directory of a real run (${runs})`)
  const notReal = (): string => `${dir} is not the output directory of a whole real run: ${runs}; one with --profile-only writes no results.json`
  const results = await readJsonFile(join(dir, 'results.json'), 'results file', notReal) as { scenario: Scenario, extra: { machine: { cpus: number } }, lone: { reference: { completionMs: number } }, metrics: Record<'peers' | 'baseline', RunMetrics> }
  const profile = await readJsonFile(join(dir, 'workload-profile.json'), 'workload profile', notReal) as WorkloadProfile
  return { dir: resolve(dir), scenario: results.scenario, profile, cores: results.extra.machine.cpus, lone: results.lone.reference.completionMs, metrics: results.metrics }
}

/**
 * The model's metrics for a real run's scenario: the current default parameters
 * (what is being calibrated; results.json holds those of the day of the run),
 * PARAMS over them, and the real machine's cores shared.
 */
async function model (real: RealRun, params: Partial<ModelParams>): Promise<ModelMetrics> {
  const scenario: Scenario = { ...real.scenario, model: { ...DEFAULT_MODEL, ...params, sharedCores: real.cores } }
  const lone = loneReference((await simulate({ scenario, profile: real.profile, mode: 'lone' })).result)
  const peers = (await simulate({ scenario, profile: real.profile, mode: 'peers' })).result
  const baseline = (await simulate({ scenario, profile: real.profile, mode: 'baseline' })).result
  return { lone: lone.completionMs, peers: metrics(peers, lone), baseline: metrics(baseline, lone) }
}

/** The lone node is reported, not fitted: the fit is about bursts. */
async function compare (real: RealRun, params: Partial<ModelParams>): Promise<Comparison[]> {
  const m = await model(real, params)
  const lone: Comparison = { dir: real.dir, nodes: 1, run: 'lone', metric: 'p50', real: real.lone, model: m.lone, error: (m.lone - real.lone) / real.lone }
  return [lone, ...(['peers', 'baseline'] as const).flatMap(run => {
    const pairs = [
      ['originBytes', real.metrics[run].origin.bytes, m[run].origin.bytes],
      ['p50', real.metrics[run].completion.p50, m[run].completion.p50],
      ['p99', real.metrics[run].completion.p99, m[run].completion.p99]
    ] as const
    return pairs.map(([metric, r, x]) => ({ dir: real.dir, nodes: real.scenario.nodes, run, metric, real: r, model: x, error: (x - r) / r }))
  })]
}

/** Every combination of the grid; sorted by the mean absolute error of all metrics (peers and baseline) over all real runs. */
async function fit (runs: RealRun[]): Promise<Array<{ params: Partial<ModelParams>, error: number }>> {
  let combos: Array<Partial<ModelParams>> = [{}]
  for (const [key, options] of Object.entries(GRID)) combos = combos.flatMap(c => options.map(v => ({ ...c, [key]: v })))
  const scored: Array<{ params: Partial<ModelParams>, error: number }> = []
  for (const [i, params] of combos.entries()) {
    const errors = (await Promise.all(runs.map(async r => await compare(r, params)))).flat().filter(c => c.run !== 'lone').map(c => Math.abs(c.error))
    scored.push({ params, error: errors.reduce((a, b) => a + b, 0) / errors.length })
    if ((i + 1) % 20 === 0) log(`${i + 1}/${combos.length} combinations`)
  }
  return scored.sort((a, b) => a.error - b.error)
}

function show (metric: string, v: number): string {
  return metric === 'originBytes' ? `${(v / 1e6).toFixed(1)} MB` : `${(v / 1000).toFixed(2)} s`
}
