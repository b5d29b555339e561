import assert from 'node:assert/strict'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { it } from 'node:test'
import type { WorkloadProfile } from '../../simulations/lib/image.ts'
import { loadProfile, profileKey } from '../../simulations/lib/profile.ts'
import { parseScenario } from '../../simulations/lib/scenario.ts'
import { tempDir } from '../helpers/tmp.ts'

// Issue 14: on a fresh clone there is no recorded profile, and `npm run sim:model` failed.
it('the model records a workload profile when none matches the scenario, and uses a recorded one after', async () => {
  const repo = await tempDir()
  const scenario = parseScenario({ origin: { mbit: 50, latencyMs: 1, kind: 'registry' } }, 'burst-registry')
  const profile = (key: string): WorkloadProfile => ({ key, image: 'python', workload: scenario.workload, chunks: [], packs: [], catalogs: [], metadata: { bytes: 0, requests: 0 }, lone: { coldMs: 1, warmMs: 1, mountMs: 1 } })
  // Another image's profile does not count.
  await mkdir(join(repo, 'results', 'sim', 'other'), { recursive: true })
  await writeFile(join(repo, 'results', 'sim', 'other', 'workload-profile.json'), JSON.stringify(profile('0123456789ab')))
  await assert.rejects(loadProfile(repo, scenario), /no workload profile for burst-registry.*--profile-only/)

  const recorded: string[] = []
  const record = async (out: string): Promise<void> => {
    recorded.push(out)
    await mkdir(out, { recursive: true })
    await writeFile(join(out, 'workload-profile.json'), JSON.stringify(profile(profileKey(scenario))))
  }
  assert.equal((await loadProfile(repo, scenario, { record })).key, profileKey(scenario))
  assert.equal(recorded.length, 1)
  assert.ok(recorded[0]!.startsWith(join(repo, 'results', 'sim', 'profile-burst-registry-')))
  await loadProfile(repo, scenario, { record })
  assert.equal(recorded.length, 1, 'the recorded profile is found the second time')
})
