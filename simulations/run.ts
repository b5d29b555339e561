/**
 * The real-process runner:
 *
 *   node simulations/run.ts simulations/scenarios/NAME.json [--out DIR] [--nodes N] [--profile-only]
 *
 * Converts the python fixture with a fresh key, then runs the scenario three
 * times on this machine, each on fresh agents: a lone node (the yardstick, and
 * the workload profile the model replays), the scenario with peers, and the
 * same scenario with peers disabled (the baseline: every node pulls from the
 * origin). Writes results.json, summary.md, SVG charts and the workload profile
 * (workload-profile.json) to --out (default results/sim/<scenario>-<nodes>-<timestamp>/).
 * --profile-only runs the lone node alone and writes only the profile: the model
 * records one this way when none matches its scenario (any origin kind will do,
 * since a profile is keyed by image and workload).
 *
 * SIGINT/SIGTERM stop the run and tear everything down (agents, origin,
 * mounts, namespaces); a second signal exits at once.
 */
import { cpus, release } from 'node:os'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { UsageError } from '../src/errors.ts'
import { runCluster, type ClusterResult, type RunMode } from './lib/cluster.ts'
import { catalogFiles, fetchedChunks, preparePythonImage, type ProfileChunk, type WorkloadProfile } from './lib/image.ts'
import { netnsSupport, removeStaleNamespaces } from './lib/netns.ts'
import { exec } from './lib/proc.ts'
import { profileKey } from './lib/profile.ts'
import { writeReport } from './lib/report.ts'
import { loadScenario } from './lib/scenario.ts'

const REPO = resolve(import.meta.dirname, '..')
reportErrors('run')
const { values, positionals, int } = parseScriptArgs({
  script: 'run',
  usage: 'usage: node simulations/run.ts simulations/scenarios/NAME.json [--out DIR] [--nodes N] [--profile-only]',
  options: { out: { type: 'string' }, nodes: { type: 'string' }, 'profile-only': { type: 'boolean' } },
  positionals: 1
})
const nodes = int('nodes', { min: 1, max: 100_000 })
const scenario = await loadScenario(positionals[0]!)
if (nodes !== undefined) scenario.nodes = nodes
if (!('fixture' in scenario.image)) throw new UsageError(`${scenario.name}: a synthetic image exists only in the model (node simulations/model.ts)`)
const profileOnly = values['profile-only'] === true
if (profileOnly) scenario.origin = { ...scenario.origin, kind: 'oci-layout' }
if (scenario.origin.kind === 'registry') throw new UsageError(`${scenario.name}: real runs serve the image as an OCI layout over HTTP; origin.kind "registry" exists only in the model (node simulations/model.ts)`)
const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)
const out = resolve(values.out ?? join(REPO, 'results', 'sim', `${scenario.name}-${scenario.nodes}-${stamp}`))
const work = join('/var/tmp/shoal-sim', `${scenario.name}-${stamp}-${process.pid}`)
const log = (line: string): void => { process.stderr.write(`sim: ${line}\n`) }

const controller = new AbortController()
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    log(`${sig}: stopping and tearing down (again to exit at once)`)
    controller.abort(new Error(`stopped by ${sig}`))
    process.once(sig, () => process.exit(130))
  })
}

try {
  const stale = await removeStaleNamespaces()
  if (stale > 0) log(`removed ${stale} network namespaces left by an earlier run`)
  if (scenario.netns) {
    const support = await netnsSupport()
    if (!support.ok) throw new Error(`the scenario asks for network namespaces, which this machine refuses: ${support.reason}`)
  }
  log(`preparing the image in ${work}`)
  const image = await preparePythonImage(join(work, 'image'), log)
  let chunks: ProfileChunk[] = []
  let catalogs: WorkloadProfile['catalogs'] = []
  const cluster = async (mode: RunMode, inspect?: (states: string[]) => Promise<void>): Promise<ClusterResult> =>
    await runCluster({ scenario, image, mode, dir: join(work, mode), logDir: join(out, 'logs', mode), signal: controller.signal, log, ...(inspect !== undefined ? { inspect } : {}) })

  const lone = await cluster('lone', async ([state]) => {
    chunks = await fetchedChunks(state!)
    catalogs = await catalogFiles(state!, image.catalogs)
  })
  const loneNode = lone.nodes[0]!
  const profile: WorkloadProfile = {
    key: profileKey(scenario),
    image: 'python',
    workload: scenario.workload,
    chunks,
    packs: image.packs,
    catalogs,
    // The origin counts catalogs as metadata (they are not packs); the lone node got them all from it.
    metadata: { bytes: lone.origin.metadataBytes - catalogs.reduce((a, c) => a + c.size, 0), requests: lone.origin.metadataRequests - catalogs.length },
    lone: { coldMs: loneNode.completionMs ?? NaN, warmMs: loneNode.warmMs ?? NaN, mountMs: loneNode.mountMs ?? NaN }
  }
  await mkdir(out, { recursive: true })
  await writeFile(join(out, 'workload-profile.json'), JSON.stringify(profile, null, 1) + '\n')
  if (profileOnly) {
    log(`wrote ${join(out, 'workload-profile.json')}`)
  } else {
    const peers = scenario.peers ? await cluster('peers') : undefined
    const baseline = await cluster('baseline')
    const m = await writeReport(out, {
      kind: 'real',
      scenario,
      date: new Date().toISOString(),
      command: `node simulations/run.ts ${process.argv.slice(2).join(' ')}`,
      lone,
      runs: { ...(peers !== undefined ? { peers } : {}), baseline },
      extra: { image: { manifestDigest: image.manifestDigest, packBytes: image.packBytes }, machine: { cpus: cpus().length, kernel: release() }, source: await sourceVersion() }
    })
    for (const [name, x] of Object.entries(m)) {
      log(`${name}: ${x.ok}/${x.nodes} ok, p50 ${(x.completion.p50 / 1000).toFixed(2)} s, p99 ${(x.completion.p99 / 1000).toFixed(2)} s (${x.p99OverLone.toFixed(2)}x lone), origin ${(x.origin.bytes / 1e6).toFixed(1)} MB (${x.egressFactor.toFixed(2)}x lone, chunks ${x.chunkEgressFactor.toFixed(2)}x)`)
    }
    log(`wrote ${join(out, 'summary.md')}`)
  }
} catch (err) {
  if (!controller.signal.aborted) throw err
  log('stopped; agents, origin, mounts and namespaces are torn down')
  process.exitCode = 130
} finally {
  await rm(work, { recursive: true, force: true }).catch(() => {})
}

/** The commit the agents ran, and whether src/ had changes on top of it: results only mean something with it. */
async function sourceVersion (): Promise<{ commit: string, srcModified: boolean }> {
  const commit = (await exec('git', ['-C', REPO, 'rev-parse', 'HEAD'])).trim()
  const status = await exec('git', ['-C', REPO, 'status', '--porcelain', '--', 'src'])
  return { commit, srcModified: status.trim() !== '' }
}
