/**
 * The cached read path, A/B and against squashfuse: fio, `find`, stat walks and `cat`
 * through a FUSE mount served in-process by the read stack of one or more source trees
 * (this checkout, and e.g. an older commit unpacked with `git archive COMMIT src test
 * benchmarks bin package.json | tar -x -C DIR` plus a node_modules symlink), and by
 * squashfuse over a squashfs of the same files, alternating run by run, on one machine
 * at one time.
 *
 *   npm run bench:cached-reads -- [--trees DIR,DIR[#segments=0|#warm=0]] [--runs 3] [--mib 512] [--restart] [--no-squashfuse] [--only NAME,..] [--work PARENT | --data DIR]
 *
 * The image: one MIB MiB incompressible file, 1,000 files of 1-8 KiB, and a tree of
 * 930 directories and 7,200 empty files (the metadata walks). Each measurement is a
 * child process: for a shoal tree it fills a disk cache by reading the image through
 * its mount (chunks from a directory origin, verified as they enter), then mounts again
 * with a fresh resolver and memory cache over the same disk cache (the agent's steady
 * state), or over the cache reopened as a new process would (--restart: nothing
 * verified yet). Before every test the page cache, dentries and inodes are dropped, and
 * the metadata tests and `cat` get a fresh mount (shoal: a new filesystem, resolver and
 * memory cache in the same process; squashfuse: a new process). squashfuse: 0.1.x
 * (libfuse3, multi-threaded, its defaults) over `mksquashfs -comp zstd
 * -Xcompression-level 3` of the same tree (incompressible blocks stored raw).
 * Reports medians, and the serving process's CPU (all threads) per GB read.
 * Needs root (FUSE, drop_caches). Prints a Markdown table. SHOAL_BENCH_CHILD_FLAGS are
 * node flags for the children; SHOAL_BENCH_PROFILE=DIR writes a CPU profile of each test
 * (the serving process, during the test only) there.
 */
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors, requireRoot } from '../scripts/lib/errors.ts'
import { fio, type FioSpec } from './lib/fio.ts'
import { makeSquashfs, mountSquashfuse } from './lib/mounts.ts'
import { Cleanup, dropCaches, markdownTable, median, pct, say, sh, spread, unmountAllBelow } from './lib/proc.ts'

reportErrors('cached-reads')
const { values, int, fail } = parseScriptArgs({
  script: 'cached-reads',
  usage: 'usage: node benchmarks/cached-reads.ts [--trees DIR,DIR[#segments=0|#warm=0]] [--runs 3] [--mib 512] [--restart] [--no-squashfuse] [--only NAME,..] [--work PARENT | --data DIR]',
  allowNegative: true,
  options: {
    trees: { type: 'string', default: resolve(import.meta.dirname, '..') },
    runs: { type: 'string', default: '3' },
    mib: { type: 'string', default: '512' },
    restart: { type: 'boolean', default: false },
    squashfuse: { type: 'boolean', default: true },
    work: { type: 'string', default: '/var/tmp' },
    only: { type: 'string' },
    child: { type: 'string' },
    data: { type: 'string' }
  }
})
const runs = int('runs', { min: 1 })
const mib = int('mib', { min: 1 })
if (values.child !== undefined && values.data === undefined) fail('--child needs --data')

const SQUASHFUSE = 'squashfuse'
const TESTS: Array<{ name: string, spec: FioSpec }> = [
  { name: 'sequential 1 MiB, buffered', spec: { rw: 'read', bs: '1M', direct: false, numjobs: 1 } },
  { name: 'random 4 KiB O_DIRECT, 1 job', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 1, runtime: 10 } },
  { name: 'random 4 KiB O_DIRECT, 4 jobs', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 4, runtime: 10 } }
]
/** Timed shell commands on a fresh mount with every cache dropped (MNT is the mount point). */
const COLD: Array<{ name: string, script: (mnt: string) => string }> = [
  { name: '`find MOUNT` (readdir only), cold', script: mnt => `find ${mnt} > /dev/null` },
  { name: "`find MOUNT -printf '%s %m %U %T@'` (lstat each), cold", script: mnt => `find ${mnt} -printf '%s %m %U %T@\\n' > /dev/null` },
  { name: '`find MOUNT -print0 | xargs -0 stat`, cold', script: mnt => `find ${mnt} -print0 | xargs -0 stat > /dev/null` },
  { name: 'cat of 1,000 small files (1-8 KiB), cold', script: mnt => `find ${mnt}/small -type f -print0 | xargs -0 cat > /dev/null` }
]
const TEST_NAMES = [...TESTS.map(t => t.name), ...COLD.map(t => t.name)]
interface Measure { test: string, value: number, unit: string, cpuSecondsPerGB?: number, cpuMs?: number }

if (values.child !== undefined) await child(values.child, values.data!)
else await main()

function selected (name: string): boolean {
  return values.only === undefined || values.only.split(',').some(o => name.includes(o))
}

async function main (): Promise<void> {
  requireRoot('FUSE and drop_caches')
  // DIR#segments=0, DIR#warm=0: that tree with a disk cache option changed (see child), for an A/B of one change.
  const trees = values.trees.split(',').map(t => t.includes('#') ? resolve(t.slice(0, t.indexOf('#'))) + t.slice(t.indexOf('#')) : resolve(t))
  if (values.squashfuse) trees.push(SQUASHFUSE)
  await mkdir(values.work, { recursive: true })
  // --data DIR: reuse (or make, and keep) the image and squashfs there, e.g. for a profile of one child.
  const data = values.data ?? await mkdtemp(join(values.work, 'shoal-bench-cached-reads-'))
  try {
    if (!existsSync(join(data, 'image', 'shoal')) || (values.squashfuse && !existsSync(join(data, 'image.sqfs')))) await prepare(data)
    const results = new Map<string, Map<string, Measure[]>>(trees.map(t => [t, new Map()]))
    for (let i = 0; i < runs; i++) {
      for (const tree of i % 2 === 0 ? trees : [...trees].reverse()) {
        say(`run ${i + 1}/${runs}: ${tree}`)
        for (const m of await runChild(tree, data)) {
          const list = results.get(tree)!.get(m.test) ?? []
          list.push(m)
          results.get(tree)!.set(m.test, list)
          say(`  ${m.test}: ${m.value.toFixed(0)} ${m.unit}${m.cpuSecondsPerGB !== undefined ? `, ${m.cpuSecondsPerGB.toFixed(1)} s CPU per GB` : ''}${m.cpuMs !== undefined ? `, ${m.cpuMs.toFixed(0)} ms CPU` : ''}`)
        }
      }
    }
    const rows: string[][] = []
    const shoalTrees = trees.filter(t => t !== SQUASHFUSE)
    for (const test of TEST_NAMES.filter(selected)) {
      const value = (tree: string): number => median((results.get(tree)!.get(test) ?? []).map(m => m.value))
      rows.push([test.replaceAll('|', '\\|'), ...trees.map(tree => {
        const ms = results.get(tree)!.get(test) ?? []
        const v = ms.map(m => m.value)
        const cpu = ms.flatMap(m => m.cpuSecondsPerGB !== undefined ? [m.cpuSecondsPerGB] : [])
        const cpuMs = ms.flatMap(m => m.cpuMs !== undefined ? [m.cpuMs] : [])
        return `${median(v).toFixed(0)} ${ms[0]?.unit ?? ''}${spread(v, x => x.toFixed(0))}${cpu.length > 0 ? `; ${median(cpu).toFixed(1)} s CPU/GB` : ''}${cpuMs.length > 0 ? `; ${median(cpuMs).toFixed(0)} ms CPU` : ''}`
      }), ...(values.squashfuse
        ? shoalTrees.map(tree => {
          const ms = results.get(tree)!.get(test) ?? []
          const theirs = results.get(SQUASHFUSE)!.get(test) ?? []
          // Speed as a share of squashfuse's (times are inverted): of the medians, and the median of
          // each run's ratio (run i of both ran minutes apart, so a change of load hits both alike).
          const share = (mine: number, other: number): number => ms[0]?.unit === 'ms' ? other / mine : mine / other
          const perRun = ms.flatMap((m, i) => theirs[i] !== undefined ? [share(m.value, theirs[i]!.value)] : [])
          return `${pct(share(value(tree), value(SQUASHFUSE)))}; per run ${pct(median(perRun))}${spread(perRun, x => pct(x))}`
        })
        : [])])
    }
    console.log(markdownTable(['test', ...trees, ...(values.squashfuse ? shoalTrees.map(t => `${t} / squashfuse`) : [])], rows))
  } finally {
    await unmountAllBelow(data)
    if (values.data === undefined) await rm(data, { recursive: true, force: true })
  }
}

/** The synthetic image (converted by this checkout), its tree on disk and a squashfs of it. */
async function prepare (data: string): Promise<void> {
  const helpers = await import('../test/fs/helpers.ts')
  const { contentBytes } = await import('../test/helpers/synthetic.ts')
  type Entry = Parameters<typeof helpers.convertSynthetic>[1][number] extends infer L ? L extends Array<infer E> ? E : never : never
  const entries: Entry[] = [{ type: 'dir', path: 'data' }, { type: 'file', path: 'data/big.bin', content: { size: mib * 1048576, seed: 'big' } }, { type: 'dir', path: 'small' }]
  for (let i = 0; i < 1000; i++) entries.push({ type: 'file', path: `small/f${i}.bin`, content: { size: 1024 + (i * 7919) % 7169, seed: `s${i}` } })
  entries.push({ type: 'dir', path: 'meta' })
  for (let a = 0; a < 30; a++) {
    entries.push({ type: 'dir', path: `meta/d${a}` })
    for (let b = 0; b < 30; b++) {
      entries.push({ type: 'dir', path: `meta/d${a}/e${b}` })
      for (let c = 0; c < 8; c++) entries.push({ type: 'file', path: `meta/d${a}/e${b}/f${c}.txt`, content: '' })
    }
  }
  if (!existsSync(join(data, 'image', 'shoal'))) {
    say(`converting the image (${mib} MiB file, 1,000 small files, 930 directories)`)
    await helpers.convertSynthetic(join(data, 'image'), [entries], { compression: 'none' })
  }
  if (!values.squashfuse) return
  const tree = join(data, 'tree')
  for (const e of entries) {
    if (e.type === 'dir') await mkdir(join(tree, e.path), { recursive: true })
    else if (e.type === 'file') {
      await mkdir(dirname(join(tree, e.path)), { recursive: true })
      await writeFile(join(tree, e.path), contentBytes(e.content))
    }
  }
  say('mksquashfs of the same tree (zstd level 3)')
  await makeSquashfs(tree, join(data, 'image.sqfs'))
}

async function runChild (tree: string, data: string): Promise<Measure[]> {
  const args = [...(process.env.SHOAL_BENCH_CHILD_FLAGS ?? '').split(' ').filter(f => f !== ''), import.meta.filename, '--child', tree, '--data', data, '--mib', values.mib,
    ...(values.restart ? ['--restart'] : []), ...(values.only !== undefined ? ['--only', values.only] : [])]
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  proc.stdout.on('data', (d: Buffer) => { out += d.toString() })
  const code = await new Promise<number | null>(resolve => proc.once('exit', resolve))
  if (code !== 0) throw new Error(`the measurement of ${tree} failed (exit ${code})`)
  return out.trim().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Measure)
}

/** One tree's measurements (a child process: its own read stack, mount and CPU count). */
async function child (spec: string, data: string): Promise<void> {
  if (spec === SQUASHFUSE) return await squashfuseChild(data)
  const [tree, option] = spec.split('#') as [string, string | undefined]
  // DIR#segments=0 (no disk cache segments) or DIR#warm=0 (no page-cache warming around small reads): an A/B of one change.
  const cacheOptions = option?.startsWith('segments=') === true
    ? { segmentChunkLimit: Number(option.slice('segments='.length)) }
    : option?.startsWith('warm=') === true ? { warmWindowBytes: Number(option.slice('warm='.length)) } : undefined
  const helpers = await import(join(tree, 'test/fs/helpers.ts')) as typeof import('../test/fs/helpers.ts')
  const { mountImage } = await import(join(tree, 'src/fs/mount.ts')) as typeof import('../src/fs/mount.ts')
  const { ChunkResolver } = await import(join(tree, 'src/fetch/resolver.ts')) as typeof import('../src/fetch/resolver.ts')
  const { MemoryCache } = await import(join(tree, 'src/cache/memory-cache.ts')) as typeof import('../src/cache/memory-cache.ts')
  const { DiskCache } = await import(join(tree, 'src/cache/disk-cache.ts')) as typeof import('../src/cache/disk-cache.ts')
  const { OriginChunkSource } = await import(join(tree, 'src/fetch/chunk-source.ts')) as typeof import('../src/fetch/chunk-source.ts')
  const image = { layoutDir: join(data, 'image', 'shoal'), tag: 'img', source: undefined as never }
  if (!existsSync(image.layoutDir)) throw new Error(`no image at ${image.layoutDir}`)
  const work = await mkdtemp(join(data, 'run-'))
  const stack = await helpers.openReadStack(work, image, cacheOptions === undefined ? {} : { disk: await DiskCache.open({ dir: join(work, 'cache'), maxBytes: 1 << 30, ...cacheOptions }) })
  const mnt = join(work, 'mnt')
  let mount = await mountImage({ mountpoint: mnt, view: stack.view, resolver: stack.resolver })
  try {
    await sh(`cat ${mnt}/data/big.bin > /dev/null; cat ${mnt}/small/* > /dev/null`, { timeoutMs: 600_000 })
  } finally {
    await mount.unmount()
  }
  const disk = values.restart ? await DiskCache.open({ dir: join(work, 'cache'), maxBytes: 1 << 30, ...cacheOptions }) : stack.disk
  if (values.restart) await stack.disk.close()
  const freshMount = async (): Promise<typeof mount> => {
    const resolver = new ChunkResolver({ disk, memory: new MemoryCache(64 << 20), remote: [new OriginChunkSource(stack.ranges)] })
    return await mountImage({ mountpoint: mnt, view: stack.view, resolver })
  }
  mount = await freshMount()
  try {
    for (const t of TESTS) {
      if (!selected(t.name)) continue
      await dropCaches()
      const profile = await startProfile()
      const cpu = process.cpuUsage()
      const r = await fio(join(mnt, 'data/big.bin'), t.spec)
      const used = process.cpuUsage(cpu)
      await profile?.(t.name)
      const cpuSecondsPerGB = (used.user + used.system) / 1e6 / (r.ioBytes / 1e9)
      console.log(JSON.stringify({ test: t.name, value: t.spec.bs === '4k' ? r.iops : r.bytesPerSecond / 1e6, unit: t.spec.bs === '4k' ? 'IOPS' : 'MB/s', cpuSecondsPerGB } satisfies Measure))
    }
    for (const t of COLD) {
      if (!selected(t.name)) continue
      await mount.unmount()
      mount = await freshMount()
      await dropCaches()
      const profile = await startProfile()
      const cpu = process.cpuUsage()
      const started = performance.now()
      await sh(t.script(mnt), { timeoutMs: 600_000 })
      const value = performance.now() - started
      const used = process.cpuUsage(cpu)
      await profile?.(t.name)
      console.log(JSON.stringify({ test: t.name, value, unit: 'ms', cpuMs: (used.user + used.system) / 1e3 } satisfies Measure))
    }
  } finally {
    await mount.unmount()
    await disk.close()
    stack.close()
    await rm(work, { recursive: true, force: true })
  }
}

/**
 * With SHOAL_BENCH_PROFILE=DIR, a CPU profile of the child during one test (not the
 * fill before it): returns the function that stops it and writes DIR/<test>.cpuprofile.
 */
async function startProfile (): Promise<((test: string) => Promise<void>) | undefined> {
  const dir = process.env.SHOAL_BENCH_PROFILE
  if (dir === undefined || dir === '') return undefined
  const { Session } = await import('node:inspector/promises')
  const session = new Session()
  session.connect()
  await session.post('Profiler.enable')
  await session.post('Profiler.setSamplingInterval', { interval: 200 })
  await session.post('Profiler.start')
  return async (test: string) => {
    const { profile } = await session.post('Profiler.stop')
    session.disconnect()
    await mkdir(dir, { recursive: true })
    await writeFile(join(dir, `${test.replace(/[^a-z0-9]+/gi, '-').slice(0, 60)}.cpuprofile`), JSON.stringify(profile))
  }
}

/** The same tests against squashfuse: a fresh squashfuse process for each cold test. */
async function squashfuseChild (data: string): Promise<void> {
  const cleanup = new Cleanup()
  const mnt = join(data, 'mnt-squashfuse')
  const cpuOf = async (pid: number): Promise<number> => {
    const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ')
    return (Number(fields[11]) + Number(fields[12])) / 100 // utime + stime, in clock ticks of 10 ms
  }
  try {
    let s = await mountSquashfuse(cleanup, join(data, 'image.sqfs'), mnt)
    for (const t of TESTS) {
      if (!selected(t.name)) continue
      await dropCaches()
      const before = await cpuOf(s.pid)
      const r = await fio(join(mnt, 'data/big.bin'), t.spec)
      const cpuSecondsPerGB = (await cpuOf(s.pid) - before) / (r.ioBytes / 1e9)
      console.log(JSON.stringify({ test: t.name, value: t.spec.bs === '4k' ? r.iops : r.bytesPerSecond / 1e6, unit: t.spec.bs === '4k' ? 'IOPS' : 'MB/s', cpuSecondsPerGB } satisfies Measure))
    }
    for (const t of COLD) {
      if (!selected(t.name)) continue
      await s.stop()
      s = await mountSquashfuse(cleanup, join(data, 'image.sqfs'), mnt)
      await dropCaches()
      const before = await cpuOf(s.pid)
      const started = performance.now()
      await sh(t.script(mnt), { timeoutMs: 600_000 })
      const value = performance.now() - started
      console.log(JSON.stringify({ test: t.name, value, unit: 'ms', cpuMs: (await cpuOf(s.pid) - before) * 1000 } satisfies Measure))
    }
  } finally {
    await cleanup.runAll()
  }
}
