/**
 * The cached read path alone, A/B: fio through a FUSE mount served in-process by the
 * read stack of one or more source trees (this checkout, and e.g. an older commit
 * unpacked with `git archive COMMIT src test benchmarks bin package.json | tar -x -C DIR`
 * plus a node_modules symlink), alternating trees run by run, on one machine at one time.
 *
 *   node benchmarks/cached-reads.ts [--trees DIR,DIR] [--runs 3] [--mib 256] [--restart] [--work PARENT]
 *
 * Each measurement is a child process of one tree: it fills a disk cache by reading the
 * image through its mount (chunks from a directory origin, verified as they enter), then
 * mounts again with a fresh resolver and memory cache over the same disk cache (the
 * agent's steady state), or over the cache reopened as a new process would (--restart:
 * nothing verified yet), drops the page cache before each test and runs: sequential 1 MiB
 * buffered, random 4 KiB O_DIRECT with 1 and 4 jobs (5 s), `cat` of 1,000 small files.
 * Reports the medians, and the process's CPU (all threads) per GB read.
 * Needs root (FUSE, drop_caches). Prints a Markdown table.
 */
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { fio, type FioSpec } from './lib/fio.ts'
import { dropCaches, markdownTable, median, say, sh, spread, unmountAllBelow } from './lib/proc.ts'

const { values } = parseArgs({
  options: {
    trees: { type: 'string', default: resolve(import.meta.dirname, '..') },
    runs: { type: 'string', default: '3' },
    mib: { type: 'string', default: '256' },
    restart: { type: 'boolean', default: false },
    work: { type: 'string', default: '/var/tmp' },
    child: { type: 'string' },
    data: { type: 'string' }
  }
})

const TESTS: Array<{ name: string, spec: FioSpec }> = [
  { name: 'sequential 1 MiB, buffered', spec: { rw: 'read', bs: '1M', direct: false, numjobs: 1 } },
  { name: 'random 4 KiB O_DIRECT, 1 job', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 1, runtime: 5 } },
  { name: 'random 4 KiB O_DIRECT, 4 jobs', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 4, runtime: 5 } }
]
const SMALL = 'cat of 1,000 small files (1-8 KiB), cold'
interface Measure { test: string, value: number, unit: string, cpuSecondsPerGB?: number }

if (values.child !== undefined) await child(values.child, values.data!)
else await main()

async function main (): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('run as root: FUSE and drop_caches need it')
  const trees = values.trees.split(',').map(t => resolve(t))
  const runs = Number(values.runs)
  await mkdir(values.work, { recursive: true })
  const data = await mkdtemp(join(values.work, 'shoal-bench-cached-reads-'))
  try {
    const results = new Map<string, Map<string, Measure[]>>(trees.map(t => [t, new Map()]))
    for (let i = 0; i < runs; i++) {
      for (const tree of i % 2 === 0 ? trees : [...trees].reverse()) {
        say(`run ${i + 1}/${runs}: ${tree}`)
        for (const m of await runChild(tree, data)) {
          const list = results.get(tree)!.get(m.test) ?? []
          list.push(m)
          results.get(tree)!.set(m.test, list)
          say(`  ${m.test}: ${m.value.toFixed(0)} ${m.unit}${m.cpuSecondsPerGB !== undefined ? `, ${m.cpuSecondsPerGB.toFixed(1)} s CPU per GB` : ''}`)
        }
      }
    }
    const rows: string[][] = []
    for (const test of [...TESTS.map(t => t.name), SMALL]) {
      rows.push([test, ...trees.map(tree => {
        const ms = results.get(tree)!.get(test) ?? []
        const v = ms.map(m => m.value)
        const cpu = ms.flatMap(m => m.cpuSecondsPerGB !== undefined ? [m.cpuSecondsPerGB] : [])
        return `${median(v).toFixed(0)} ${ms[0]?.unit ?? ''}${spread(v, x => x.toFixed(0))}${cpu.length > 0 ? `; ${median(cpu).toFixed(1)} s CPU/GB` : ''}`
      })])
    }
    console.log(markdownTable(['test', ...trees], rows))
  } finally {
    await unmountAllBelow(data)
    await rm(data, { recursive: true, force: true })
  }
}

async function runChild (tree: string, data: string): Promise<Measure[]> {
  const args = [import.meta.filename, '--child', tree, '--data', data, '--mib', values.mib, ...(values.restart ? ['--restart'] : [])]
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  proc.stdout.on('data', (d: Buffer) => { out += d.toString() })
  const code = await new Promise<number | null>(resolve => proc.once('exit', resolve))
  if (code !== 0) throw new Error(`the measurement of ${tree} failed (exit ${code})`)
  return out.trim().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Measure)
}

/** One tree's measurements (a child process: its own read stack, mount and CPU count). */
async function child (tree: string, data: string): Promise<void> {
  const helpers = await import(join(tree, 'test/fs/helpers.ts')) as typeof import('../test/fs/helpers.ts')
  const { mountImage } = await import(join(tree, 'src/fs/mount.ts')) as typeof import('../src/fs/mount.ts')
  const { ChunkResolver } = await import(join(tree, 'src/fetch/resolver.ts')) as typeof import('../src/fetch/resolver.ts')
  const { MemoryCache } = await import(join(tree, 'src/cache/memory-cache.ts')) as typeof import('../src/cache/memory-cache.ts')
  const { DiskCache } = await import(join(tree, 'src/cache/disk-cache.ts')) as typeof import('../src/cache/disk-cache.ts')
  const { OriginChunkSource } = await import(join(tree, 'src/fetch/chunk-source.ts')) as typeof import('../src/fetch/chunk-source.ts')
  const mib = Number(values.mib)
  const image = { layoutDir: join(data, 'image', 'shoal'), tag: 'img', source: undefined as never }
  if (!existsSync(image.layoutDir)) {
    const entries: Parameters<typeof helpers.convertSynthetic>[1][number] = [
      { type: 'dir', path: 'data' }, { type: 'file', path: 'data/big.bin', content: { size: mib * 1048576, seed: 'big' } }, { type: 'dir', path: 'small' }]
    for (let i = 0; i < 1000; i++) (entries as unknown[]).push({ type: 'file', path: `small/f${i}.bin`, content: { size: 1024 + (i * 7919) % 7169, seed: `s${i}` } })
    await helpers.convertSynthetic(join(data, 'image'), [entries], { compression: 'none' })
  }
  const work = await mkdtemp(join(data, 'run-'))
  const stack = await helpers.openReadStack(work, image)
  const mnt = join(work, 'mnt')
  let mount = await mountImage({ mountpoint: mnt, view: stack.view, resolver: stack.resolver })
  try {
    await sh(`cat ${mnt}/data/big.bin > /dev/null; cat ${mnt}/small/* > /dev/null`, { timeoutMs: 600_000 })
  } finally {
    await mount.unmount()
  }
  const disk = values.restart ? await DiskCache.open({ dir: join(work, 'cache'), maxBytes: 1 << 30 }) : stack.disk
  if (values.restart) await stack.disk.close()
  const resolver = new ChunkResolver({ disk, memory: new MemoryCache(64 << 20), remote: [new OriginChunkSource(stack.ranges)] })
  mount = await mountImage({ mountpoint: mnt, view: stack.view, resolver })
  try {
    for (const t of TESTS) {
      await dropCaches()
      const cpu = process.cpuUsage()
      const r = await fio(join(mnt, 'data/big.bin'), t.spec)
      const used = process.cpuUsage(cpu)
      const cpuSecondsPerGB = (used.user + used.system) / 1e6 / (r.ioBytes / 1e9)
      console.log(JSON.stringify({ test: t.name, value: t.spec.bs === '4k' ? r.iops : r.bytesPerSecond / 1e6, unit: t.spec.bs === '4k' ? 'IOPS' : 'MB/s', cpuSecondsPerGB } satisfies Measure))
    }
    await dropCaches()
    const started = performance.now()
    await sh(`find ${mnt}/small -type f -print0 | xargs -0 cat > /dev/null`)
    console.log(JSON.stringify({ test: SMALL, value: performance.now() - started, unit: 'ms' } satisfies Measure))
  } finally {
    await mount.unmount()
    await disk.close()
    stack.close()
  }
}
