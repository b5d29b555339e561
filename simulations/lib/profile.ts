/**
 * Where the model gets its workload: the profile a real lone run recorded
 * (run.ts writes it next to its results), or, for a synthetic image, one made up here.
 */
import { createHash } from 'node:crypto'
import { readdir, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { readJsonFile } from '../../scripts/lib/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import type { ProfileChunk, WorkloadProfile } from './image.ts'
import type { Scenario } from './scenario.ts'

/** A scenario's image and workload, as a key: scenarios that share both share a profile. */
export function profileKey (scenario: Scenario): string {
  return createHash('sha256').update(JSON.stringify([scenario.image, scenario.workload])).digest('hex').slice(0, 12)
}

/**
 * The profile for SCENARIO: FILE when given, else the newest one a real run of
 * the same image and workload left in results/sim/<run>/workload-profile.json,
 * else one recorded now by a real lone run (RECORD: about 20 s), so that the
 * model works on a fresh clone.
 */
export async function loadProfile (repo: string, scenario: Scenario, options: { file?: string | undefined, record?: (out: string) => Promise<void> } = {}): Promise<WorkloadProfile> {
  if ('synthetic' in scenario.image) return syntheticProfile(scenario.image.synthetic)
  if (options.file !== undefined) return await readJsonFile(options.file, 'workload profile') as WorkloadProfile
  const dir = join(repo, 'results', 'sim')
  const found = await findProfile(dir, scenario)
  if (found !== undefined) return found
  if (options.record === undefined) {
    throw new Error(`no workload profile for ${scenario.name}'s image and workload in results/sim: record one with a real run (node simulations/run.ts SCENARIO --profile-only), or pass --profile FILE`)
  }
  const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)
  await options.record(join(dir, `profile-${scenario.name}-${stamp}`))
  const recorded = await findProfile(dir, scenario)
  if (recorded === undefined) throw new Error(`the lone run recorded no workload profile for ${scenario.name}: see its output above`)
  return recorded
}

/** The newest profile in DIR's runs for SCENARIO's image and workload. */
async function findProfile (dir: string, scenario: Scenario): Promise<WorkloadProfile | undefined> {
  for (const path of await recordedProfiles(dir)) {
    const profile = JSON.parse(await readFile(path, 'utf8')) as WorkloadProfile
    if (profile.key === profileKey(scenario)) return profile
  }
  return undefined
}

/** Every results/sim/<run>/workload-profile.json, newest first. */
async function recordedProfiles (dir: string): Promise<string[]> {
  const runs = await readdir(dir).catch(() => [] as string[])
  const found = await Promise.all(runs.map(async r => {
    const path = join(dir, r, 'workload-profile.json')
    return await stat(path).then(st => ({ path, mtime: st.mtimeMs }), () => undefined)
  }))
  return found.filter(f => f !== undefined).sort((a, b) => b.mtime - a.mtime).map(f => f.path)
}

const MIB = 1 << 20
const PACK_CHUNKS = 16

/**
 * An image of incompressible 1 MiB chunks in 16 MiB packs, read whole in pack
 * order (a full pull, as in Kraken's benchmark). Digests are random but fixed
 * (hashes of their index), so runs are repeatable; each layer has a 1 MB catalog,
 * about what the real converter writes for a layer of that size.
 */
export function syntheticProfile (spec: { gigabytes: number, layers: number }): WorkloadProfile {
  const total = Math.round(spec.gigabytes * 1e9 / MIB)
  const digest = (what: string): Digest => `sha256:${createHash('sha256').update(what).digest('hex')}`
  const chunks: ProfileChunk[] = []
  for (let i = 0; i < total; i++) {
    const layer = Math.floor(i * spec.layers / total)
    const pack = digest(`layer ${layer} pack ${Math.floor(i / PACK_CHUNKS)}`)
    chunks.push({ digest: digest(`chunk ${i}`), pack, packOffset: (i % PACK_CHUNKS) * MIB, length: MIB, storedLength: MIB })
  }
  return {
    key: 'synthetic',
    image: `synthetic ${spec.gigabytes} GB`,
    workload: 'read every chunk',
    chunks,
    packs: [...new Set(chunks.map(c => c.pack))],
    catalogs: Array.from({ length: spec.layers }, (_, i) => ({ digest: digest(`catalog ${i}`), size: 1e6 })),
    metadata: { bytes: 4096, requests: 4 },
    lone: { coldMs: NaN, warmMs: 0, mountMs: 0 }
  }
}
