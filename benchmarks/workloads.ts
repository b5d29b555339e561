/**
 * ImageApparate's four workloads, cold, each timed from "start the container" to
 * "done": shoal (`shoal run --no-p2p`, an in-process agent, against `shoal origin
 * serve`) vs a full pull (docker-registry + skopeo copy + umoci unpack + runc) of the
 * same image, both through a token bucket at the same cap (--mbit, default 100).
 *
 *   node benchmarks/workloads.ts [--runs 3] [--mbit 100] [--workloads seq,files,python,gcc]
 *                                [--variants lazy,traced,background] [--skip-pull] [--shoal BIN] [--work PARENT] [--keep]
 *
 * (also `npm run bench:workloads -- ...`). The workloads:
 *   seq     `cat /data/big.bin | wc -c`: a 500 MB incompressible file read sequentially
 *           (benchmarks/lib/data-images.ts: the fixtures' Debian base + one data layer);
 *   files   `cat $(cat /data/read.list) | wc -c`: 1,000 files of 4-16 KiB, in a random
 *           order, out of the 10,000 in the image;
 *   python  `python3 -c 'import json, sqlite3; print(42)'` in the python fixture image;
 *   gcc     write hello.c, `cc -O2` it and run it (benchmarks/lib/gcc-image.ts).
 * shoal's variants, each on a fresh state dir (empty cache):
 *   lazy        the image as converted;
 *   traced      a version with a prefetch list (`shoal trace` of the same command, untimed);
 *   background  the image as converted, with `--background-fetch` (the rest of the image
 *               streamed once the start-up reads are served).
 *
 * Before every timed run: sync, drop the page cache, load the tools again (tools warm,
 * image data cold), as benchmarks/agent.ts does. Needs root. Prints Markdown tables,
 * writes results/workloads.json; everything it starts is stopped in finally blocks, and
 * its work dir removed unless --keep.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { cpus, loadavg, release, totalmem } from 'node:os'
import { join, resolve } from 'node:path'
import { convertImage } from '../src/convert/convert.ts'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors, requireRoot } from '../scripts/lib/errors.ts'
import { generateKeys, loadPrivateKey } from '../src/format/signing.ts'
import { startOriginServer } from '../src/origin/server.ts'
import { ensureDataImages } from './lib/data-images.ts'
import { ensureGccImage, layerSizes } from './lib/gcc-image.ts'
import { SHOAL as SHOAL_HERE } from './lib/mounts.ts'
import { Cleanup, dropCaches, markdownTable, mb, median, mountsBelowOrAt, run, say, secs, spread, unmountAllBelow } from './lib/proc.ts'
import { startRegistry } from './lib/registry.ts'
import { startThrottleProxy } from './lib/throttle-proxy.ts'

type WorkloadName = 'seq' | 'files' | 'python' | 'gcc'
type VariantName = 'lazy' | 'traced' | 'background'

const HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from gcc"); return 0; }\n'
const COMMANDS: Record<WorkloadName, { command: string[], check: (stdout: string) => boolean }> = {
  seq: { command: ['sh', '-c', 'cat /data/big.bin | wc -c'], check: out => out.trim() === '500000000' },
  files: { command: ['sh', '-c', 'cat $(cat /data/read.list) | wc -c'], check: out => /^\d{7,}$/.test(out.trim()) },
  python: { command: ['python3', '-c', 'import json, sqlite3; print(42)'], check: out => out.trim() === '42' },
  gcc: {
    command: ['sh', '-c', `printf '${HELLO_C.replaceAll('\n', '\\n').replaceAll('%', '%%')}' > /tmp/hello.c && cc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello`],
    check: out => out.trim() === 'hello from gcc'
  }
}
const AIMS: Record<WorkloadName, number> = { seq: 1, files: 5, python: 10, gcc: 10 }

reportErrors('workloads')
const args = parseScriptArgs({
  script: 'workloads',
  usage: 'usage: node benchmarks/workloads.ts [--runs 3] [--mbit 100] [--workloads seq,files,python,gcc] [--variants lazy,traced,background] [--skip-pull] [--shoal BIN] [--work PARENT] [--keep]\n' +
    '--shoal: the shoal command to time (default: this checkout\'s bin/shoal), e.g. another checkout\'s for a before/after comparison.',
  options: {
    runs: { type: 'string', default: '3' },
    mbit: { type: 'string', default: '100' },
    workloads: { type: 'string', default: 'seq,files,python,gcc' },
    variants: { type: 'string', default: 'lazy,traced,background' },
    'skip-pull': { type: 'boolean', default: false },
    shoal: { type: 'string' },
    work: { type: 'string' },
    keep: { type: 'boolean', default: false }
  }
})
const values = args.values
const runs = args.int('runs', { min: 1, max: 20 })
const mbit = args.number('mbit', { min: 1, max: 100_000 })
const workloadNames = values.workloads.split(',').map(s => s.trim()) as WorkloadName[]
for (const w of workloadNames) if (!(w in COMMANDS)) args.fail(`unknown workload ${w} (seq, files, python, gcc)`)
const variants = values.variants.split(',').map(s => s.trim()) as VariantName[]
for (const v of variants) if (!['lazy', 'traced', 'background'].includes(v)) args.fail(`unknown variant ${v} (lazy, traced, background)`)
requireRoot('mounts, runc and drop_caches')
const rate = mbit * 1e6 / 8
const SHOAL = resolve(values.shoal ?? SHOAL_HERE)

const cleanup = new Cleanup()
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    say(`${sig}: cleaning up`)
    void cleanup.runAll().finally(() => process.exit(130))
  })
}

interface Workload { name: WorkloadName, source: string, command: string[], check: (stdout: string) => boolean, compressed: number, uncompressed: number }
interface ShoalSample { seconds: number, originBytes: number, stdout: string }
interface PullSample { seconds: number, pull: number, unpack: number, run: number, registryBytes: number, stdout: string }

if (values.work !== undefined) await mkdir(resolve(values.work), { recursive: true })
const work = await mkdtemp(join(resolve(values.work ?? '/var/tmp'), 'shoal-bench-workloads-'))
cleanup.add('remove the work dir', async () => {
  if (values.keep) { say(`kept ${work}`); return }
  const left = await mountsBelowOrAt(work)
  if (left.length > 0) { say(`NOT removing ${work}: still mounted below it: ${left.map(m => m.mountpoint).join(', ')}`); return }
  await rm(work, { recursive: true, force: true })
})
cleanup.add('unmount leftovers', async () => { await unmountAllBelow(work) })

const started = new Date()
const loads: number[] = []
try {
  const workloads: Workload[] = []
  const sizes = async (layout: string, tag: string): Promise<{ compressed: number, uncompressed: number }> => {
    const s = await layerSizes(layout, tag)
    return { compressed: s.config + s.layers.reduce((n, l) => n + l.size, 0), uncompressed: s.layers.reduce((n, l) => n + l.uncompressedSize, 0) }
  }
  for (const name of workloadNames) {
    let layout: string
    let tag: string
    if (name === 'seq' || name === 'files') {
      const data = await ensureDataImages({ log: say })
      layout = data.layoutDir; tag = name
    } else if (name === 'python') {
      const fixtures = await ensureRealFixtures({ log: line => say(`fixtures: ${line}`) })
      layout = fixtures.layoutDir; tag = 'python'
    } else {
      const gcc = await ensureGccImage({ log: say })
      layout = gcc.layoutDir; tag = 'gcc'
    }
    workloads.push({ name, source: `oci:${layout}:${tag}`, ...COMMANDS[name], ...await sizes(layout, tag) })
  }

  const images = join(work, 'images')
  const keys = join(work, 'keys')
  await generateKeys(keys)
  const pub = join(keys, 'shoal.pub')
  const signingKey = await loadPrivateKey(join(keys, 'shoal.key'))
  for (const w of workloads) {
    say(`converting ${w.name} (${w.source})`)
    await convertImage({ source: w.source, dest: `oci:${images}:${w.name}`, signingKey })
    if (variants.includes('traced')) {
      say(`recording ${w.name}'s prefetch list: shoal trace (untimed)`)
      const traced = await run(SHOAL, ['trace', `oci:${images}:${w.name}`, '--key', join(keys, 'shoal.key'), '--tag', `${w.name}-traced`, '--', ...w.command], { timeoutMs: 1_200_000 })
      say(`shoal trace: ${traced.stdout.trim().split('\n').at(-1) ?? ''}`)
    }
  }

  const origin = await startOriginServer({ dir: images, rate })
  cleanup.add('stop the origin', origin.close)
  let proxy: Awaited<ReturnType<typeof startThrottleProxy>> | undefined
  if (!values['skip-pull']) {
    const registry = await startRegistry(join(work, 'registry'))
    cleanup.add('stop docker-registry', registry.daemon.stop)
    proxy = await startThrottleProxy({ upstreamPort: registry.port, rate })
    cleanup.add('stop the throttling proxy', proxy.close)
    for (const w of workloads) {
      say(`pushing ${w.name} to docker-registry (untimed)`)
      await run('skopeo', ['copy', '-q', '--insecure-policy', '--dest-tls-verify=false', w.source, `docker://${registry.address}/${w.name}:latest`], { timeoutMs: 600_000 })
    }
  }
  say(`origin ${origin.url}${proxy !== undefined ? `, registry behind ${proxy.address}` : ''}, both at ${mb(rate)}/s`)

  const shoal = new Map<string, ShoalSample[]>()
  const pulls = new Map<WorkloadName, PullSample[]>()
  for (let i = 0; i < runs; i++) {
    for (const w of workloads) {
      // The variants and the pull alternate their order from one run to the next.
      const order: Array<VariantName | 'pull'> = [...variants, ...(proxy !== undefined ? ['pull' as const] : [])]
      if (i % 2 === 1) order.reverse()
      for (const v of order) {
        if (v === 'pull') {
          const s = await fullPull(w, i, proxy!)
          ;(pulls.get(w.name) ?? pulls.set(w.name, []).get(w.name)!).push(s)
          say(`run ${i + 1}/${runs} ${w.name} full pull: ${secs(s.seconds)} (skopeo ${secs(s.pull)}, umoci ${secs(s.unpack)}, runc ${secs(s.run)}), ${mb(s.registryBytes)}`)
          continue
        }
        const state = join(work, 'state', `${w.name}-${v}-${i}`)
        await settle()
        const before = origin.stats.bytesSent
        const image = v === 'traced' ? `${w.name}-traced` : w.name
        const r = await run(SHOAL, ['run', image, '--state', state, '--origin', origin.url, '--trust', pub, '--no-p2p', ...(v === 'background' ? ['--background-fetch'] : []), '--', ...w.command], { timeoutMs: 1_200_000 })
        if (!w.check(r.stdout)) throw new Error(`${w.name} (${v}) printed ${JSON.stringify(r.stdout.slice(0, 200))}`)
        const s: ShoalSample = { seconds: r.seconds, originBytes: origin.stats.bytesSent - before, stdout: r.stdout.trim() }
        ;(shoal.get(`${w.name}/${v}`) ?? shoal.set(`${w.name}/${v}`, []).get(`${w.name}/${v}`)!).push(s)
        say(`run ${i + 1}/${runs} ${w.name} shoal ${v}: ${secs(s.seconds)}, origin sent ${mb(s.originBytes)}`)
        await rm(state, { recursive: true, force: true })
      }
    }
  }

  const lines: string[] = []
  const emit = (text: string): void => { lines.push(text); console.log(text) }
  emit(`\n### ImageApparate's workloads at ${mbit} Mbit/s, cold: median of ${runs} (min-max)\n`)
  const rows: string[][] = []
  for (const w of workloads) {
    const p = pulls.get(w.name) ?? []
    const tPull = median(p.map(s => s.seconds))
    for (const v of variants) {
      const s = shoal.get(`${w.name}/${v}`) ?? []
      if (p.length > 0 && s.some(x => x.stdout !== p[0]!.stdout)) throw new Error(`${w.name} (${v}) printed ${s[0]!.stdout}, the full pull ${p[0]!.stdout}`)
      const t = median(s.map(x => x.seconds))
      rows.push([w.name, `shoal, ${v}`, secs(t) + spread(s.map(x => x.seconds), secs), mb(median(s.map(x => x.originBytes))), Number.isFinite(tPull) ? `**${(tPull / t).toFixed(1)}x**` : 'n/a', `>= ${AIMS[w.name]}x`])
    }
    if (p.length > 0) {
      rows.push([w.name, 'full pull (skopeo / umoci / runc)', `${secs(tPull)}${spread(p.map(x => x.seconds), secs)} (${secs(median(p.map(x => x.pull)))} / ${secs(median(p.map(x => x.unpack)))} / ${secs(median(p.map(x => x.run)))})`,
        mb(median(p.map(x => x.registryBytes))), '1x', ''])
    }
  }
  emit(markdownTable(['workload', 'how', 'start to done', 'from the origin / registry', 'speed-up', 'aim'], rows))
  emit(`\nImages: ${workloads.map(w => `${w.name} ${mb(w.compressed)} compressed, ${mb(w.uncompressed)} uncompressed`).join('; ')}. Load average (1 min) before the timed runs: ${Math.min(...loads).toFixed(1)}-${Math.max(...loads).toFixed(1)}.`)

  const out = join(import.meta.dirname, '..', 'results')
  await mkdir(out, { recursive: true })
  await writeFile(join(out, 'workloads.json'), JSON.stringify({
    date: started.toISOString(),
    machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryBytes: totalmem(), kernel: release() },
    options: { runs, mbit, workloads: workloadNames, variants, skipPull: values['skip-pull'] },
    loads,
    workloads: workloads.map(w => ({ name: w.name, source: w.source, command: w.command, compressed: w.compressed, uncompressed: w.uncompressed })),
    shoal: Object.fromEntries(shoal),
    pulls: Object.fromEntries(pulls),
    markdown: lines.join('\n')
  }, null, 2))
  say('wrote results/workloads.json')
} finally {
  await cleanup.runAll()
}

/**
 * Before every timed run: write back and drop the page cache, then load the tools again
 * (node and shoal's sources, skopeo, umoci, runc): tools warm, image data cold.
 */
async function settle (): Promise<void> {
  await dropCaches()
  await run(SHOAL, ['--help'])
  for (const tool of ['skopeo', 'umoci', 'runc']) await run(tool, ['--version'])
  loads.push(loadavg()[0]!)
}

/** skopeo copy from the registry (through the capped proxy), umoci unpack, runc run: timed as one. */
async function fullPull (w: Workload, i: number, proxy: { address: string, stats: { bytesDown: number } }): Promise<PullSample> {
  const dir = join(work, 'pull', `${w.name}-${i}`)
  const id = `shoal-workload-${process.pid}-${w.name}-${i}`
  const bytesBefore = proxy.stats.bytesDown
  try {
    await mkdir(dir, { recursive: true })
    await settle()
    const t0 = performance.now()
    await run('skopeo', ['copy', '-q', '--insecure-policy', '--src-tls-verify=false', `docker://${proxy.address}/${w.name}:latest`, `oci:${join(dir, 'layout')}:${w.name}`], { timeoutMs: 1_200_000 })
    const t1 = performance.now()
    await run('umoci', ['unpack', '--image', `${join(dir, 'layout')}:${w.name}`, join(dir, 'bundle')], { timeoutMs: 1_200_000 })
    const t2 = performance.now()
    const configPath = join(dir, 'bundle', 'config.json')
    const spec = JSON.parse(await readFile(configPath, 'utf8')) as { process: { terminal: boolean, args: string[] } }
    spec.process.terminal = false
    spec.process.args = w.command
    await writeFile(configPath, JSON.stringify(spec))
    const r = await run('runc', ['run', '--bundle', join(dir, 'bundle'), id], { timeoutMs: 600_000 })
    const t3 = performance.now()
    if (!w.check(r.stdout)) throw new Error(`${w.name} (full pull) printed ${JSON.stringify(r.stdout.slice(0, 200))}`)
    return { seconds: (t3 - t0) / 1000, pull: (t1 - t0) / 1000, unpack: (t2 - t1) / 1000, run: (t3 - t2) / 1000, registryBytes: proxy.stats.bytesDown - bytesBefore, stdout: r.stdout.trim() }
  } finally {
    await run('runc', ['delete', '--force', id], { check: false })
    await rm(dir, { recursive: true, force: true })
  }
}
