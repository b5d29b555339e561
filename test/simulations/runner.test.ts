import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { mountsBelow } from '../../simulations/lib/cluster.ts'
import { netnsSupport, simNamespaces } from '../../simulations/lib/netns.ts'
import type { RunMetrics } from '../../simulations/lib/report.ts'
import { tempDir } from '../helpers/tmp.ts'

const RUN = join(import.meta.dirname, '..', '..', 'simulations', 'run.ts')
const READS = ['/etc/os-release', '/usr/bin/python3.11', '/usr/lib/x86_64-linux-gnu/libc.so.6', '/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6']

interface Results {
  metrics: Record<'peers' | 'baseline', RunMetrics>
  runs: Record<'peers' | 'baseline', { nodes: Array<{ outcome: string, bannedPeers: number, error?: string, peer?: { server: Record<string, number> } }> }>
}

/** Runs the real-process runner on SCENARIO and checks, after it exits, that it left nothing behind. */
async function runScenario (scenario: object): Promise<{ out: string, results: Results }> {
  const dir = await tempDir('shoal-sim-run-')
  const file = join(dir, 'scenario.json')
  await writeFile(file, JSON.stringify(scenario))
  const out = join(dir, 'out')
  const child = spawn(process.execPath, [RUN, file, '--out', out], { stdio: ['ignore', 'inherit', 'pipe'] })
  let stderr = ''
  child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d })
  const timer = setTimeout(() => child.kill('SIGTERM'), 240_000)
  const code = await new Promise<number | null>(resolve => child.once('exit', resolve))
  clearTimeout(timer)
  assert.equal(code, 0, stderr)

  // Nothing of that run may survive it: processes, mounts, namespaces.
  const work = `-${child.pid}`
  const leftovers: string[] = []
  for (const pid of (await readdir('/proc')).filter(p => /^\d+$/.test(p))) {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')
    if (cmdline.includes('/var/tmp/shoal-sim/') && cmdline.includes(`${work}/`)) leftovers.push(`process ${pid}: ${cmdline.replace(/\0/g, ' ')}`)
  }
  const workDirs = (await readdir('/var/tmp/shoal-sim').catch(() => [] as string[])).filter(d => d.endsWith(work))
  assert.deepEqual(workDirs, [], 'the work directory is removed')
  leftovers.push(...(await mountsBelow('/var/tmp/shoal-sim')).filter(m => m.path.includes(`${work}/`)).map(m => `mount ${m.path}`))
  leftovers.push(...(await simNamespaces()).filter(n => n.startsWith(`shoalsim-${child.pid}-`)).map(n => `namespace ${n}`))
  assert.deepEqual(leftovers, [])

  for (const f of ['summary.md', 'completion-cdf.svg', 'origin-egress.svg', 'bytes-by-source-peers.svg', 'bytes-by-source-baseline.svg', 'workload-profile.json']) {
    assert.ok((await readFile(join(out, f), 'utf8')).length > 100, `${f} is written`)
  }
  return { out, results: JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as Results }
}

describe('simulation runner: real agents', () => {
  it('4 agents on loopback, one killed mid-burst and one bad peer: the others finish, peers save origin bytes, teardown leaves nothing', async () => {
    const { results } = await runScenario({
      name: 'runner-test',
      nodes: 4,
      workload: { read: READS },
      origin: { mbit: 100, latencyMs: 0 },
      faults: { kill: { share: 0.25, atMs: 400 }, badPeers: { share: 0.25 } },
      timeouts: { chunkMs: 20_000, runMs: 60_000, agentStartMs: 60_000 }
    })
    for (const run of ['peers', 'baseline'] as const) {
      const nodes = results.runs[run].nodes
      assert.equal(nodes.filter(n => n.outcome === 'killed').length, 1, run)
      assert.deepEqual(nodes.filter(n => n.outcome !== 'killed' && n.outcome !== 'ok'), [], run)
    }
    assert.ok(results.metrics.peers.origin.bytes < results.metrics.baseline.origin.bytes,
      `origin sent ${results.metrics.peers.origin.bytes} bytes with peers, ${results.metrics.baseline.origin.bytes} without`)
    assert.ok(results.runs.peers.nodes.some(n => n.bannedPeers > 0), 'the bad peer was caught and banned')
  })

  it('4 agents flooded by a hostile peer (HAVE?, JOIN, unread WANTs, WANT/CANCEL churn): all finish, origin egress stays <= 1.2', async () => {
    const { results } = await runScenario({
      name: 'hostile-test',
      nodes: 4,
      workload: { read: READS },
      origin: { mbit: 100, latencyMs: 0 },
      faults: { hostilePeers: { share: 0.25 } },
      timeouts: { chunkMs: 20_000, runMs: 120_000, agentStartMs: 60_000 }
    })
    assert.deepEqual(results.runs.peers.nodes.map(n => n.outcome), ['ok', 'ok', 'ok', 'ok'], JSON.stringify(results.runs.peers.nodes.map(n => n.error)))
    // The floods arrived: the honest nodes read them at the flooder's rate.
    const throttled = results.runs.peers.nodes.reduce((sum, n) => sum + (n.peer?.server.throttled ?? 0), 0)
    assert.ok(throttled > 0, 'the honest nodes throttled the hostile peer\'s frames')
    assert.ok(results.metrics.peers.egressFactor <= 1.2, `origin egress ${results.metrics.peers.egressFactor.toFixed(2)}x a lone node's`)
  })

  it('2 agents in network namespaces behind shaped links', async (t) => {
    const support = await netnsSupport()
    if (!support.ok) {
      t.skip(`network namespaces are not available here: ${support.reason}`)
      return
    }
    const { results } = await runScenario({
      name: 'netns-test',
      nodes: 2,
      netns: true,
      workload: { read: READS },
      links: { mbit: 200, latencyMs: 0 },
      timeouts: { chunkMs: 20_000, runMs: 60_000, agentStartMs: 60_000 }
    })
    for (const run of ['peers', 'baseline'] as const) assert.deepEqual(results.runs[run].nodes.map(n => n.outcome), ['ok', 'ok'], run)
  })
})
