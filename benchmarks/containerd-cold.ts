/**
 * containerd, cold: CRI PullImage through container exit, with the shoal snapshotter
 * (a `shoal agent --snapshotter-socket` beside containerd, lazy layers) vs containerd's
 * own overlayfs snapshotter (a full pull: download and unpack every layer), the
 * registry behind one proxy capped at --mbit for both, in the same run.
 *
 *   node benchmarks/containerd-cold.ts [--runs 3] [--mbit 100] [--workloads python,gcc]
 *     [--agent-log-level info] [--trace] [--keep-logs DIR] [--rerun] [--prefetch]
 *
 * Workloads: `python` (the python fixture image, `python3 -c 'import json, sqlite3;
 * print(42)'`), `gcc` (benchmarks/lib/gcc-image.ts: the base fixture + gcc and libc6-dev;
 * the command writes a hello.c, compiles it with `cc -O2` and runs it).
 *
 * Setup (untimed): Debian's docker-registry on 127.0.0.1 gets the original images (skopeo)
 * and their shoal conversions (`shoal convert docker://REG/R:T docker://REG/R:T-shoal`,
 * which also tags sha256-<manifest>.shoal). The registry is reached only through the
 * throttle proxy: pods name the images as PROXY/R:T, so containerd pulls through it and
 * the agent looks for the conversion in PROXY/R as well (same storage, so the same
 * repository and tags).
 *
 * Each sample: a fresh containerd (its own dir) and, for shoal, a fresh agent (own state,
 * `--no-p2p`: only the registry serves); the sandbox (pause) image pulled once untimed;
 * sync and drop the page cache; then runPod: PullImage, RunPodSandbox, CreateContainer,
 * StartContainer until EXITED; the output is checked; bytes through the proxy counted
 * (and the agent's own origin bytes); then containerd and the agent are stopped and
 * their directories removed. Within a run the two snapshotters alternate (their order
 * flips every run). Prints a Markdown table; writes results/containerd-cold.json.
 *
 * --prefetch converts with a prefetch list: into a local layout, `shoal trace` of the
 * workload's own command (runc), then `shoal push` (which also writes the digest tag); the
 * agent then fetches the list in the background from the first layer's Prepare on.
 * --trace puts a request recorder (benchmarks/lib/request-tap.ts) in front of the proxy
 * and writes every sample's registry requests with their timing into the JSON.
 * --rerun, for analysis: after each sample, the same pod again on the same containerd
 * (and agent), page cache dropped, image already pulled: the run without the network
 * (shoal: chunks from the agent's disk cache), recorded in the JSON, not in the table.
 */
import { copyFile, mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join } from 'node:path'
import type { AgentStats } from '../src/agent/agent.ts'
import { startAgentProcess, type AgentProcess } from '../src/agent/agent-process.ts'
import { callAgent } from '../src/agent/control.ts'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { generateKeys } from '../src/format/signing.ts'
import { startContainerd, type Containerd } from '../test/helpers/containerd/containerd.ts'
import type { RunPodResult } from '../test/helpers/containerd/cri-client.ts'
import { pushSandboxImage } from '../test/helpers/containerd/sandbox-image.ts'
import { ensureGccImage, layerSizes } from './lib/gcc-image.ts'
import { SHOAL } from './lib/mounts.ts'
import { Cleanup, dropCaches, markdownTable, mb, median, mountsBelowOrAt, run, say, unmountAllBelow } from './lib/proc.ts'
import { startRegistry } from './lib/registry.ts'
import { startRequestTap, type RequestTap, type TappedRequest } from './lib/request-tap.ts'
import { startThrottleProxy } from './lib/throttle-proxy.ts'

type Snapshotter = 'overlayfs' | 'shoal'
type WorkloadName = 'python' | 'gcc'

interface Workload {
  name: WorkloadName
  /** skopeo source of the original image. */
  source: string
  /** repository:tag in the registry. */
  repoTag: string
  command: string[]
  expected: string
  /** Layer sizes of the original image (compressed = what a full pull moves). */
  sizes?: { config: number, layers: Array<{ size: number, uncompressedSize: number }> }
}

interface Sample {
  run: number
  workload: WorkloadName
  snapshotter: Snapshotter
  startedAt: string
  loadavgBefore: number[]
  loadavgAfter: number[]
  timings: RunPodResult['timings']
  /** pull + sandbox + create + start-to-exit, seconds. */
  totalSeconds: number
  pullSeconds: number
  /** Bytes the proxy sent to clients during the timed part (registry to containerd and agent). */
  proxyBytes: number
  proxyConnections: number
  /** The agent's view (shoal only). */
  agent?: {
    originBytes: number
    originChunks: number
    sources: AgentStats['sources']
    snapshotter: AgentStats['snapshotter']
    mounts: number
    eventLoop: AgentStats['eventLoop']
  }
  requests?: TappedRequest[]
  /** CPU seconds (user + system) the agent process used during the timed part. */
  agentCpuSeconds?: number
  /** --rerun: the same pod again right after, page cache dropped, nothing from the network. */
  rerun?: { timings: RunPodResult['timings'], proxyBytes: number, agentCpuSeconds?: number }
}

/** utime + stime of PID in seconds (USER_HZ 100). */
async function cpuSeconds (pid: number | undefined): Promise<number> {
  if (pid === undefined) return 0
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / 100
}

reportErrors('containerd-cold')
const { values, int, number, fail } = parseScriptArgs({
  script: 'containerd-cold',
  usage: 'usage: node benchmarks/containerd-cold.ts [--runs 3] [--mbit 100] [--workloads python,gcc]\n' +
    '  [--agent-log-level info] [--trace] [--keep-logs DIR] [--rerun] [--prefetch]',
  options: {
    runs: { type: 'string', default: '3' },
    mbit: { type: 'string', default: '100' },
    workloads: { type: 'string', default: 'python,gcc' },
    'agent-log-level': { type: 'string', default: 'info' },
    trace: { type: 'boolean', default: false },
    'keep-logs': { type: 'string' },
    rerun: { type: 'boolean', default: false },
    prefetch: { type: 'boolean', default: false }
  }
})
const runs = int('runs', { min: 1 })
const rate = number('mbit', { min: 1, max: 100_000 }) * 1e6 / 8
const workloadNames = values.workloads.split(',').map(s => s.trim()).filter(s => s !== '') as WorkloadName[]
for (const w of workloadNames) if (w !== 'python' && w !== 'gcc') fail(`unknown workload ${w} (python, gcc)`)
const keepLogs = values['keep-logs']
if (keepLogs !== undefined) await mkdir(keepLogs, { recursive: true })

const HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from gcc"); return 0; }\n'
const WORKLOAD_COMMANDS: Record<WorkloadName, { command: string[], expected: string }> = {
  python: { command: ['python3', '-c', 'import json, sqlite3; print(42)'], expected: '42\n' },
  gcc: {
    command: ['sh', '-c', `printf '${HELLO_C.replaceAll('\n', '\\n').replaceAll('%', '%%')}' > /tmp/hello.c && cc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello`],
    expected: 'hello from gcc\n'
  }
}

// Short paths: unix sockets (agent control, snapshotter, containerd) must fit in 107 bytes.
const work = await mkdtemp('/tmp/sb-ctd-')
const cleanup = new Cleanup()
let interrupted = false
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    interrupted = true
    say(`${sig}: cleaning up`)
    void cleanup.runAll().then(() => rm(work, { recursive: true, force: true })).finally(() => process.exit(130))
  })
}

const samples: Sample[] = []
try {
  const fixtures = await ensureRealFixtures({ log: say })
  const workloads: Workload[] = []
  for (const name of workloadNames) {
    if (name === 'python') {
      workloads.push({ name, source: fixtures.ref('python'), repoTag: 'python:3', ...WORKLOAD_COMMANDS.python, sizes: await layerSizes(fixtures.layoutDir, 'python') })
    } else {
      const gcc = await ensureGccImage({ log: say })
      workloads.push({ name, source: gcc.ref, repoTag: 'gcc:12', ...WORKLOAD_COMMANDS.gcc, sizes: await layerSizes(gcc.layoutDir, 'gcc') })
    }
  }
  await generateKeys(join(work, 'keys'))
  const pub = join(work, 'keys', 'shoal.pub')

  const registry = await startRegistry(join(work, 'registry'))
  cleanup.add('stop docker-registry', registry.daemon.stop)
  const proxy = await startThrottleProxy({ upstreamPort: registry.port, rate })
  cleanup.add('close the proxy', proxy.close)
  let tap: RequestTap | undefined
  if (values.trace) {
    tap = await startRequestTap({ upstreamPort: proxy.port })
    cleanup.add('close the request tap', tap.close)
  }
  // The one address containerd and the agent are given.
  const host = tap?.address ?? proxy.address
  say(`docker-registry at ${registry.address}; proxy ${proxy.address} capped at ${values.mbit} Mbit/s${tap !== undefined ? `; request tap ${tap.address}` : ''}; images named ${host}/...`)

  // Untimed: push the originals, convert them (direct to the registry, unthrottled: the
  // repository is the same whichever address names it), push the sandbox image.
  for (const w of workloads) {
    await run('skopeo', ['copy', '-q', '--dest-tls-verify=false', w.source, `docker://${registry.address}/${w.repoTag}`], { timeoutMs: 600_000 })
    const key = join(work, 'keys', 'shoal.key')
    if (values.prefetch) {
      // The conversion with a prefetch list: into a layout, `shoal trace` of the workload's
      // own command, then pushed (push also writes the sha256-<source>.shoal tag).
      const layout = `oci:${join(work, 'traced', w.name)}:${w.name}`
      await run(SHOAL, ['convert', `docker://${registry.address}/${w.repoTag}`, layout, '--key', key, '--plain-http'], { timeoutMs: 900_000 })
      await run(SHOAL, ['trace', layout, '--key', key, '--runtime', 'runc', '--', ...w.command], { timeoutMs: 600_000 })
      await run(SHOAL, ['push', layout, `docker://${registry.address}/${w.repoTag}-shoal`, '--plain-http'], { timeoutMs: 600_000 })
      say(`${w.name}: pushed, converted, traced and pushed with its prefetch list`)
    } else {
      const converted = await run(SHOAL, ['convert', `docker://${registry.address}/${w.repoTag}`, `docker://${registry.address}/${w.repoTag}-shoal`, '--key', key, '--plain-http', '--json'], { timeoutMs: 900_000 })
      say(`${w.name}: pushed and converted (${converted.seconds.toFixed(1)} s)`)
    }
  }
  const pushedPause = await pushSandboxImage(registry.address, join(work, 'pause'))
  const sandboxImage = pushedPause.replace(registry.address, host)

  for (let i = 0; i < runs; i++) {
    const order: Snapshotter[] = i % 2 === 0 ? ['overlayfs', 'shoal'] : ['shoal', 'overlayfs']
    for (const w of workloads) {
      for (const snapshotter of order) {
        if (interrupted) throw new Error('interrupted')
        const s = await sample({ run: i, workload: w, snapshotter, host, sandboxImage, pub, proxy, tap })
        samples.push(s)
        const agentPart = s.agent !== undefined ? `, agent origin ${mb(s.agent.originBytes, 2)}, lazy layers ${s.agent.snapshotter?.lazy ?? 0}, fallbacks ${JSON.stringify(s.agent.snapshotter?.fallbacks ?? {})}` : ''
        const cpuPart = s.agentCpuSeconds !== undefined ? `, agent CPU ${s.agentCpuSeconds.toFixed(2)} s` : ''
        say(`run ${i + 1}/${runs} ${w.name} ${snapshotter}: total ${s.totalSeconds.toFixed(2)} s (pull ${s.pullSeconds.toFixed(2)}, sandbox ${(s.timings.sandboxMs / 1000).toFixed(2)}, create ${(s.timings.createMs / 1000).toFixed(2)}, start-to-exit ${(s.timings.startToExitMs / 1000).toFixed(2)}), proxy ${mb(s.proxyBytes, 2)}${agentPart}${cpuPart}, load ${s.loadavgBefore[0]!.toFixed(2)}`)
      }
    }
  }

  // The report.
  const rows: string[][] = []
  const summary: Record<string, unknown> = {}
  for (const w of workloads) {
    const of = (snap: Snapshotter): Sample[] => samples.filter(s => s.workload === w.name && s.snapshotter === snap)
    const total = (snap: Snapshotter): number => median(of(snap).map(s => s.totalSeconds))
    const speedup = total('overlayfs') / total('shoal')
    for (const snap of ['overlayfs', 'shoal'] as const) {
      const xs = of(snap)
      const totals = xs.map(s => s.totalSeconds)
      rows.push([
        w.name,
        snap === 'shoal' ? 'shoal (lazy)' : 'overlayfs (full pull)',
        `${total(snap).toFixed(2)} s`,
        `${Math.min(...totals).toFixed(2)}–${Math.max(...totals).toFixed(2)} s`,
        `${median(xs.map(s => s.pullSeconds)).toFixed(2)} s`,
        `${median(xs.map(s => (s.timings.sandboxMs + s.timings.createMs) / 1000)).toFixed(2)} s`,
        `${median(xs.map(s => s.timings.startToExitMs / 1000)).toFixed(2)} s`,
        mb(median(xs.map(s => s.proxyBytes))),
        snap === 'shoal' ? `**${speedup.toFixed(1)}x**` : '1x'
      ])
    }
    summary[w.name] = {
      overlayfs: { medianTotal: total('overlayfs'), medianPull: median(of('overlayfs').map(s => s.pullSeconds)), medianBytes: median(of('overlayfs').map(s => s.proxyBytes)) },
      shoal: { medianTotal: total('shoal'), medianPull: median(of('shoal').map(s => s.pullSeconds)), medianBytes: median(of('shoal').map(s => s.proxyBytes)) },
      speedup,
      image: w.sizes === undefined ? undefined : {
        compressedBytes: w.sizes.config + w.sizes.layers.reduce((a, l) => a + l.size, 0),
        uncompressedBytes: w.sizes.layers.reduce((a, l) => a + l.uncompressedSize, 0),
        layers: w.sizes.layers
      }
    }
  }
  console.log(`CRI PullImage through container exit, registry behind a proxy capped at ${values.mbit} Mbit/s, ${runs} run(s), median (min–max)\n`)
  console.log(markdownTable(['workload', 'snapshotter', 'total, median', 'total, min–max', 'pull', 'sandbox + create', 'start to exit', 'from the registry', 'speed-up'], rows))
  for (const w of workloads) {
    if (w.sizes === undefined) continue
    const c = w.sizes.config + w.sizes.layers.reduce((a, l) => a + l.size, 0)
    const u = w.sizes.layers.reduce((a, l) => a + l.uncompressedSize, 0)
    console.log(`\n${w.name}: ${w.sizes.layers.length} layers, ${mb(c)} compressed, ${mb(u)} uncompressed; command: ${w.command.map(a => JSON.stringify(a)).join(' ')}`)
  }
  const commit = (await run('git', ['rev-parse', '--short', 'HEAD'], { check: false, cwd: join(import.meta.dirname, '..') })).stdout.trim()
  await mkdir(join(import.meta.dirname, '..', 'results'), { recursive: true })
  await writeFile(join(import.meta.dirname, '..', 'results', 'containerd-cold.json'), JSON.stringify({
    date: new Date().toISOString(), commit, runs, mbit: Number(values.mbit), workloads: workloads.map(w => ({ name: w.name, repoTag: w.repoTag, command: w.command, expected: w.expected })),
    summary, samples
  }, null, 2))
} finally {
  await cleanup.runAll()
  const left = await mountsBelowOrAt(work)
  if (left.length > 0) {
    say(`mounts left below ${work}: ${left.map(m => m.mountpoint).join(', ')}; unmounting`)
    await unmountAllBelow(work)
  }
  if ((await mountsBelowOrAt(work)).length === 0) await rm(work, { recursive: true, force: true })
}

async function sample (p: { run: number, workload: Workload, snapshotter: Snapshotter, host: string, sandboxImage: string, pub: string, proxy: { stats: { bytesDown: number, connections: number } }, tap: RequestTap | undefined }): Promise<Sample> {
  const w = p.workload
  const dir = join(work, `${p.run}-${w.name}-${p.snapshotter === 'shoal' ? 's' : 'o'}`)
  await mkdir(dir, { recursive: true })
  const steps: Array<() => Promise<void>> = []
  let agent: AgentProcess | undefined
  let containerd: Containerd | undefined
  const agentLog = join(dir, 'agent.log')
  try {
    let snapshotter: { name: string, socket: string } | undefined
    if (p.snapshotter === 'shoal') {
      const state = join(dir, 'agent')
      const socket = join(dir, 'snap.sock')
      const fd = await open(agentLog, 'a')
      try {
        agent = await startAgentProcess(state, ['--trust', p.pub, '--snapshotter-socket', socket, '--no-p2p', '--metrics', 'off', '--log-level', values['agent-log-level']], { stderr: fd.fd, timeoutMs: 60_000 })
      } finally {
        await fd.close()
      }
      const a = agent
      steps.push(cleanup.add(`stop the agent of ${dir}`, async () => {
        await a.stop()
        // A FUSE mount left by a killed agent would break the rm below.
        await unmountAllBelow(state)
      }))
      snapshotter = { name: 'shoal', socket }
    }
    containerd = await startContainerd({
      dir: join(dir, 'containerd'),
      sandboxImage: p.sandboxImage,
      ...(snapshotter !== undefined ? { snapshotter } : {}),
      registryHosts: [p.host],
      client: { pullTimeoutMs: 600_000, defaultTimeoutMs: 120_000 },
      ...(keepLogs !== undefined ? { keep: true } : {})
    })
    const c = containerd
    steps.push(cleanup.add(`stop the containerd of ${dir}`, c.stop))
    // Untimed warm-up: the sandbox image (it would be pulled by RunPodSandbox otherwise).
    await c.criClient.pullImage(p.sandboxImage, { timeoutMs: 120_000 })
    await dropCaches()
    const loadavgBefore = loadavg()
    const bytesBefore = p.proxy.stats.bytesDown
    const connectionsBefore = p.proxy.stats.connections
    const requestsBefore = p.tap?.requests.length ?? 0
    const startedAt = new Date().toISOString()
    const t0 = p.tap !== undefined ? performance.now() - p.tap.startedAt : 0
    const cpuBefore = await cpuSeconds(agent?.child.pid)
    const result = await c.runPod({ image: `${p.host}/${w.repoTag}`, command: w.command, name: `bench-${w.name}`, exitTimeoutMs: 300_000, pullTimeoutMs: 600_000 })
    const proxyBytes = p.proxy.stats.bytesDown - bytesBefore
    const proxyConnections = p.proxy.stats.connections - connectionsBefore
    const loadavgAfter = loadavg()
    const agentCpu = await cpuSeconds(agent?.child.pid) - cpuBefore
    if (result.exitCode !== 0 || result.stdout !== w.expected) {
      throw new Error(`${w.name} under ${p.snapshotter}: exit ${result.exitCode}, stdout ${JSON.stringify(result.stdout.slice(0, 300))}, stderr ${JSON.stringify(result.stderr.slice(0, 1000))} (${result.reason} ${result.message})\n${await c.logTail(20)}`)
    }
    const t = result.timings
    const s: Sample = {
      run: p.run,
      workload: w.name,
      snapshotter: p.snapshotter,
      startedAt,
      loadavgBefore,
      loadavgAfter,
      timings: t,
      totalSeconds: (t.pullMs + t.sandboxMs + t.createMs + t.startToExitMs) / 1000,
      pullSeconds: t.pullMs / 1000,
      proxyBytes,
      proxyConnections,
      ...(agent !== undefined ? { agentCpuSeconds: agentCpu } : {})
    }
    if (agent !== undefined) {
      const stats = await callAgent<AgentStats>(agent.socket, 'GET', '/v1/stats')
      s.agent = {
        originBytes: stats.sources.origin?.bytes ?? 0,
        originChunks: stats.sources.origin?.chunks ?? 0,
        sources: stats.sources,
        snapshotter: stats.snapshotter,
        mounts: stats.mounts.length,
        eventLoop: stats.eventLoop
      }
      if ((stats.snapshotter?.lazy ?? 0) === 0) say(`warning: no layer of ${w.name} was lazy under shoal (fallbacks ${JSON.stringify(stats.snapshotter?.fallbacks)})`)
    }
    if (p.tap !== undefined) {
      // Times relative to the start of runPod.
      s.requests = p.tap.requests.slice(requestsBefore).map(r => ({
        ...r,
        sentAt: r.sentAt - t0,
        ...(r.firstByteAt !== undefined ? { firstByteAt: r.firstByteAt - t0 } : {}),
        ...(r.lastByteAt !== undefined ? { lastByteAt: r.lastByteAt - t0 } : {})
      }))
    }
    if (values.rerun) {
      await dropCaches()
      const before = p.proxy.stats.bytesDown
      const cpu = await cpuSeconds(agent?.child.pid)
      const again = await c.runPod({ image: `${p.host}/${w.repoTag}`, command: w.command, name: `bench-${w.name}-again`, exitTimeoutMs: 300_000, skipPull: true })
      if (again.exitCode !== 0 || again.stdout !== w.expected) throw new Error(`${w.name} under ${p.snapshotter}, rerun: exit ${again.exitCode}, stdout ${JSON.stringify(again.stdout.slice(0, 300))}`)
      s.rerun = { timings: again.timings, proxyBytes: p.proxy.stats.bytesDown - before, ...(agent !== undefined ? { agentCpuSeconds: await cpuSeconds(agent.child.pid) - cpu } : {}) }
      say(`  rerun: sandbox ${(again.timings.sandboxMs / 1000).toFixed(2)} s, create ${(again.timings.createMs / 1000).toFixed(2)} s, start-to-exit ${(again.timings.startToExitMs / 1000).toFixed(2)} s, proxy ${mb(s.rerun.proxyBytes, 2)}`)
    }
    return s
  } finally {
    // containerd first (it holds the overlay mounts over the agent's lazy layers), then the agent.
    for (const step of steps.reverse()) await step().catch((err: unknown) => { say(`teardown of ${dir}: ${err instanceof Error ? err.message : String(err)}`) })
    if (keepLogs !== undefined) {
      const name = dir.split('/').at(-1)!
      await copyFile(agentLog, join(keepLogs, `${name}-agent.log`)).catch(() => {})
      if (containerd !== undefined) await copyFile(containerd.logFile, join(keepLogs, `${name}-containerd.log`)).catch(() => {})
      if (containerd !== undefined) await rm(containerd.dir, { recursive: true, force: true }).catch(() => {})
    }
    const left = await mountsBelowOrAt(dir)
    if (left.length > 0) {
      say(`mounts left below ${dir} after teardown: ${left.map(m => `${m.fstype} ${m.mountpoint}`).join(', ')}`)
      await unmountAllBelow(dir)
    }
    if ((await mountsBelowOrAt(dir)).length === 0) await rm(dir, { recursive: true, force: true })
  }
}

