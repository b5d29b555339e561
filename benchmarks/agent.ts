/**
 * Agent benchmark: the lazy read path end to end, each part against the usual
 * alternative in the same run on the same machine.
 *
 *   node benchmarks/agent.ts [--runs 3] [--mbit 100] [--skip-registry] [--only cold,io,meta]
 *                            [--fio-runtime 10] [--big-mib 512] [--work PARENT] [--keep]
 *
 * 1. cold: `python3 -c 'import json, sqlite3; print(42)'` in the real python image,
 *    from nothing on the node: `shoal run` against an origin capped at --mbit (with an
 *    in-process agent, on a version of the image with a `shoal trace` prefetch list,
 *    and through an agent daemon), vs a full pull of the same image from
 *    docker-registry behind a proxy with the same cap (skopeo copy, umoci unpack,
 *    runc). Also origin bytes vs the bytes of the files the command opens (strace in
 *    the unpacked tree) and vs the image size.
 * 2. io: fio sequential and random 4 KiB reads of a 512 MiB incompressible file,
 *    shoal's FUSE mount (warm disk cache) vs squashfuse over the same files.
 * 3. meta: metadata walks of the python image and `cat` of 1,000 small files, cold
 *    (fresh mount, page cache dropped) and warm, shoal vs squashfuse.
 *
 * Needs root (mounts, chroot, drop_caches). Prints Markdown tables (stdout; progress
 * on stderr) and writes results/agent.json. Everything it starts is stopped and
 * unmounted in finally blocks, and its work dir removed unless --keep.
 */
import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { cpus, totalmem, release } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { convertImage, type ConvertReport } from '../src/convert/convert.ts'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors, requireRoot } from '../scripts/lib/errors.ts'
import { generateKeys, loadPrivateKey } from '../src/format/signing.ts'
import { OciLayout } from '../src/oci/layout.ts'
import { MediaType, type ImageManifest } from '../src/oci/types.ts'
import { startOriginServer, type OriginServer } from '../src/origin/server.ts'
import { buildSyntheticImage, type SyntheticEntry } from '../test/helpers/synthetic.ts'
import { fio, type FioSpec } from './lib/fio.ts'
import { fuseReads, makeSquashfs, mnt, mountSquashfuse, SHOAL, startAgent, type ShoalAgent } from './lib/mounts.ts'
import { openedFiles, type OpenedFiles } from './lib/opened-files.ts'
import { Cleanup, dropCaches, markdownTable, mb, median, mountsBelowOrAt, pct, q, run, say, secs, sh, spread, unmountAllBelow } from './lib/proc.ts'
import { startRegistry } from './lib/registry.ts'
import { startThrottleProxy } from './lib/throttle-proxy.ts'

const COMMAND = ['python3', '-c', 'import json, sqlite3; print(42)']

reportErrors('agent')
const args = parseScriptArgs({
  script: 'agent',
  usage: 'usage: node benchmarks/agent.ts [--runs 3] [--mbit 100] [--skip-registry] [--only cold,io,meta] [--fio-runtime 10] [--big-mib 512] [--work PARENT] [--keep]\n' +
    'Temp files go to a new directory inside PARENT (default /var/tmp), removed at the end unless --keep.',
  options: {
    runs: { type: 'string', default: '3' },
    mbit: { type: 'string', default: '100' },
    'skip-registry': { type: 'boolean', default: false },
    only: { type: 'string', default: 'cold,io,meta' },
    'fio-runtime': { type: 'string', default: '10' },
    'big-mib': { type: 'string', default: '512' },
    work: { type: 'string' },
    keep: { type: 'boolean', default: false }
  }
})
const values = args.values
const runs = args.int('runs', { min: 1, max: 20 })
const mbit = args.number('mbit', { min: 1, max: 100_000 })
const fioRuntime = args.int('fio-runtime', { min: 1, max: 600 })
const bigMiB = args.int('big-mib', { min: 1, max: 8192 })
const only = new Set(values.only.split(',').map(s => s.trim()))
for (const part of only) if (!['cold', 'io', 'meta'].includes(part)) args.fail(`--only: unknown part ${part} (cold, io, meta)`)
requireRoot('mounts, chroot and drop_caches')
const rate = mbit * 1e6 / 8
const SMALL_FILES = 1000

const cleanup = new Cleanup()
const results: Record<string, unknown> = {}
const markdown: string[] = []
const emit = (text: string): void => { markdown.push(text); console.log(text) }

// Stopped on a signal too: the main flow's finally may never run.
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    say(`${sig}: cleaning up`)
    void cleanup.runAll().finally(() => process.exit(130))
  })
}

const fixtures = await ensureRealFixtures({ log: line => say(`fixtures: ${line}`) })
// A fresh directory of our own (inside --work if given): it is deleted at the end.
if (values.work !== undefined) await mkdir(resolve(values.work), { recursive: true })
const work = await mkdtemp(join(resolve(values.work ?? '/var/tmp'), 'shoal-bench-agent-'))
cleanup.add('remove the work dir', async () => {
  if (values.keep) { say(`kept ${work}`); return }
  const left = await mountsBelowOrAt(work)
  if (left.length > 0) { say(`NOT removing ${work}: still mounted below it: ${left.map(m => m.mountpoint).join(', ')}`); return }
  await rm(work, { recursive: true, force: true })
})
cleanup.add('unmount leftovers', async () => { await unmountAllBelow(work) })

const started = new Date()
try {
  say(`work dir ${work}; runs ${runs}; origin and registry capped at ${mbit} Mbit/s (${mb(rate)}/s)`)
  const images = join(work, 'images')
  const keys = join(work, 'keys')
  await generateKeys(keys)
  const pub = join(keys, 'shoal.pub')
  const signingKey = await loadPrivateKey(join(keys, 'shoal.key'))

  // The python image: our own copy of the fixture layout (nothing here writes to the shared cache).
  const srcPython = join(work, 'src-python')
  await run('skopeo', ['copy', `oci:${fixtures.layoutDir}:python`, `oci:${srcPython}:python`])
  say('converting the python image (fresh keys)')
  const pythonReport = await convertImage({ source: `oci:${srcPython}:python`, dest: `oci:${images}:python`, signingKey })
  const pythonRootfs = join(work, 'unpack', 'python', 'rootfs')
  await mkdir(join(work, 'unpack'), { recursive: true })
  await run('umoci', ['unpack', '--image', `${srcPython}:python`, join(work, 'unpack', 'python')])

  let ioRootfs: string | undefined
  if (only.has('io') || only.has('meta')) ioRootfs = await buildIoImage(work, images, signingKey)

  if (only.has('cold')) await benchCold({ work, images, pub, srcPython, pythonRootfs, pythonReport })
  if (only.has('io')) await benchIo({ work, images, pub, ioRootfs: ioRootfs! })
  if (only.has('meta')) await benchMeta({ work, images, pub, pythonRootfs, ioRootfs: ioRootfs! })

  const out = join(import.meta.dirname, '..', 'results')
  await mkdir(out, { recursive: true })
  await writeFile(join(out, 'agent.json'), JSON.stringify({
    date: started.toISOString(),
    machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryBytes: totalmem(), kernel: release() },
    options: { runs, mbit, rateBytesPerSecond: rate, fioRuntime, bigMiB, skipRegistry: values['skip-registry'], only: [...only] },
    results,
    markdown: markdown.join('\n')
  }, null, 2))
  say('wrote results/agent.json')
} finally {
  await cleanup.runAll()
}

// ---------------------------------------------------------------------------------
// The synthetic image for io and meta

/** One BIG file of incompressible seeded bytes + 1,000 small ones; converted into IMAGES:io; returns its umoci-unpacked rootfs. */
async function buildIoImage (work: string, images: string, signingKey: Awaited<ReturnType<typeof loadPrivateKey>>): Promise<string> {
  say(`building the io image: data/big.bin (${bigMiB} MiB, random) + ${SMALL_FILES} small files`)
  const entries: SyntheticEntry[] = [
    { type: 'dir', path: 'data' },
    { type: 'file', path: 'data/big.bin', content: { size: bigMiB * 1048576, seed: 'shoal-bench-big' } },
    { type: 'dir', path: 'small' }
  ]
  for (let i = 0; i < SMALL_FILES; i++) {
    // 1–8 KiB, from a hash of the index: the same sizes every run.
    const size = 1024 + createHash('sha256').update(`size ${i}`).digest().readUInt32BE(0) % 7169
    entries.push({ type: 'file', path: `small/f${String(i).padStart(4, '0')}.bin`, content: { size, seed: `small ${i}` } })
  }
  const src = join(work, 'src-io')
  await buildSyntheticImage(src, 'io', [entries], { compression: 'none' })
  say('converting the io image')
  await convertImage({ source: `oci:${src}:io`, dest: `oci:${images}:io`, signingKey })
  await run('umoci', ['unpack', '--image', `${src}:io`, join(work, 'unpack', 'io')])
  await rm(src, { recursive: true, force: true })
  return join(work, 'unpack', 'io', 'rootfs')
}

// ---------------------------------------------------------------------------------
// 1. Cold start

interface ColdContext { work: string, images: string, pub: string, srcPython: string, pythonRootfs: string, pythonReport: ConvertReport }

async function benchCold (ctx: ColdContext): Promise<void> {
  const { work, images, pub } = ctx
  const layout = await OciLayout.open(images)
  const shoalManifest = await layout.readJson<ImageManifest>((await layout.resolveTag('python')).digest, 'manifest')
  const kindOf = new Map<string, 'catalog' | 'pack'>(shoalManifest.layers.map(l => [l.digest.slice(7), l.mediaType === MediaType.shoalCatalog ? 'catalog' : 'pack']))
  const shoalStored = shoalManifest.layers.reduce((n, l) => n + l.size, 0)
  const srcLayout = await OciLayout.open(ctx.srcPython)
  const srcManifest = await srcLayout.readJson<ImageManifest>((await srcLayout.resolveTag('python')).digest, 'manifest')
  const compressedImage = srcManifest.layers.reduce((n, l) => n + l.size, 0) + srcManifest.config.size
  const uncompressedImage = ctx.pythonReport.inputBytes

  const byKind = { catalog: 0, pack: 0, other: 0 }
  const origin: OriginServer = await startOriginServer({
    dir: images,
    rate,
    log: e => { byKind[kindOf.get(/^\/blobs\/sha256\/([0-9a-f]{64})$/.exec(e.path)?.[1] ?? '') ?? 'other'] += e.bytes }
  })
  cleanup.add('stop the origin', origin.close)
  say(`origin ${origin.url} serving ${images} at ${mb(rate)}/s`)

  let proxyAddress: string | undefined
  let proxyStats: { bytesDown: number } | undefined
  if (!values['skip-registry']) {
    const registry = await startRegistry(join(work, 'registry'))
    cleanup.add('stop docker-registry', registry.daemon.stop)
    const proxy = await startThrottleProxy({ upstreamPort: registry.port, rate })
    cleanup.add('stop the throttling proxy', proxy.close)
    proxyAddress = proxy.address
    proxyStats = proxy.stats
    say(`docker-registry at ${registry.address}, behind a proxy at ${proxy.address} capped at ${mb(rate)}/s; pushing python (untimed)`)
    await run('skopeo', ['copy', '--dest-tls-verify=false', `oci:${ctx.srcPython}:python`, `docker://${registry.address}/python:latest`])
  }

  const snapshot = (): { sent: number, catalog: number, pack: number, other: number } => ({ sent: origin.stats.bytesSent, ...byKind })
  const delta = (a: ReturnType<typeof snapshot>): ReturnType<typeof snapshot> => {
    const b = snapshot()
    return { sent: b.sent - a.sent, catalog: b.catalog - a.catalog, pack: b.pack - a.pack, other: b.other - a.other }
  }
  const check42 = (stdout: string, what: string): void => {
    if (stdout.trim() !== '42') throw new Error(`${what} printed ${JSON.stringify(stdout.slice(0, 200))}, not 42`)
  }

  // Before every timed run: write back and drop the page cache, then load the tools
  // again (node and shoal's sources, skopeo, umoci, runc). Each run then starts from
  // the same state: tools warm, image data cold, no page cache left by the previous
  // run. (On this VM, five umoci unpacks in a row without the drop took 3.4, 5.0, 8.3,
  // 9.0 and 11.8 s; with it, 2.7–4.2 s.)
  const settle = async (): Promise<void> => {
    await dropCaches()
    await run(SHOAL, ['--help'])
    for (const tool of ['skopeo', 'umoci', 'runc']) await run(tool, ['--version'])
  }
  // The same image with a prefetch list: `shoal trace` records what the command reads
  // and writes it into a new signed version (tag python-traced); agents fetch the list
  // in the background right after mounting.
  say('recording a prefetch list: shoal trace (untimed)')
  const traced = await run(SHOAL, ['trace', `oci:${images}:python`, '--key', join(dirname(pub), 'shoal.key'), '--tag', 'python-traced', '--', ...COMMAND], { timeoutMs: 300_000 })
  say(`shoal trace: ${traced.stdout.trim().split('\n').at(-1) ?? ''}`)

  const inProcess: Array<{ seconds: number, origin: ReturnType<typeof snapshot>, resolverOriginMiB: number }> = []
  const inProcessTraced: Array<{ seconds: number, origin: ReturnType<typeof snapshot> }> = []
  const daemon: Array<{ seconds: number, origin: ReturnType<typeof snapshot>, resolverOriginBytes: number, warmSeconds: number, trueSeconds: number }> = []
  const pull: Array<{ seconds: number, pull: number, unpack: number, run: number, registryBytes: number }> = []
  for (let i = 0; i < runs; i++) {
    // shoal run with its own in-process agent: nothing on the node beforehand.
    {
      const state = join(work, 'cold', `inproc-${i}`)
      await settle()
      const before = snapshot()
      const r = await run(SHOAL, ['run', 'python', '--state', state, '--origin', origin.url, '--trust', pub, '--no-p2p', '--summary', '--', ...COMMAND], { timeoutMs: 300_000 })
      check42(r.stdout, 'shoal run')
      const m = /origin ([\d.]+) MiB/.exec(r.stderr)
      inProcess.push({ seconds: r.seconds, origin: delta(before), resolverOriginMiB: m !== null ? Number(m[1]) : NaN })
      say(`run ${i + 1}/${runs} shoal run (in-process agent): ${secs(r.seconds)}, origin sent ${mb(inProcess.at(-1)!.origin.sent, 2)}`)
      await rm(state, { recursive: true, force: true })
    }
    // The same, on the image with a prefetch list.
    {
      const state = join(work, 'cold', `traced-${i}`)
      await settle()
      const before = snapshot()
      const r = await run(SHOAL, ['run', 'python-traced', '--state', state, '--origin', origin.url, '--trust', pub, '--no-p2p', '--', ...COMMAND], { timeoutMs: 300_000 })
      check42(r.stdout, 'shoal run (traced image)')
      inProcessTraced.push({ seconds: r.seconds, origin: delta(before) })
      say(`run ${i + 1}/${runs} shoal run (in-process agent, image with a prefetch list): ${secs(r.seconds)}, origin sent ${mb(inProcessTraced.at(-1)!.origin.sent, 2)}`)
      await rm(state, { recursive: true, force: true })
    }
    // shoal run through an agent daemon started beforehand (empty cache): a node's steady state.
    {
      const state = join(work, 'cold', `daemon-${i}`)
      const agent = await startAgent(cleanup, { state, origin: origin.url, trust: pub, name: 'agent-cold' })
      try {
        await settle()
        const before = snapshot()
        const r = await run(SHOAL, ['run', 'python', '--state', state, '--', ...COMMAND], { timeoutMs: 300_000 })
        check42(r.stdout, 'shoal run (daemon)')
        const stats = await agent.stats()
        // What is not fetching: the same command again (every chunk now cached), and `true` (CLI, mount, overlay, runc).
        const warm = await run(SHOAL, ['run', 'python', '--state', state, '--', ...COMMAND], { timeoutMs: 300_000 })
        check42(warm.stdout, 'shoal run (daemon, warm)')
        const noop = await run(SHOAL, ['run', 'python', '--state', state, '--', 'true'], { timeoutMs: 300_000 })
        daemon.push({ seconds: r.seconds, origin: delta(before), resolverOriginBytes: stats.sources.origin?.bytes ?? NaN, warmSeconds: warm.seconds, trueSeconds: noop.seconds })
        say(`run ${i + 1}/${runs} shoal run (agent daemon): ${secs(r.seconds)}, origin sent ${mb(daemon.at(-1)!.origin.sent, 2)}; again with chunks cached ${secs(warm.seconds)}; \`true\` ${secs(noop.seconds)}`)
      } finally {
        await agent.stop()
      }
      await rm(state, { recursive: true, force: true })
    }
    // The full pull.
    if (proxyAddress !== undefined) {
      const dir = join(work, 'cold', `pull-${i}`)
      const id = `shoal-bench-${process.pid}-${i}`
      const bytesBefore = proxyStats!.bytesDown
      try {
        await mkdir(dir, { recursive: true })
        await settle()
        const t0 = performance.now()
        await run('skopeo', ['copy', '--src-tls-verify=false', `docker://${proxyAddress}/python:latest`, `oci:${join(dir, 'layout')}:python`], { timeoutMs: 600_000 })
        const t1 = performance.now()
        await run('umoci', ['unpack', '--image', `${join(dir, 'layout')}:python`, join(dir, 'bundle')], { timeoutMs: 600_000 })
        const t2 = performance.now()
        const configPath = join(dir, 'bundle', 'config.json')
        const spec = JSON.parse(await readFile(configPath, 'utf8')) as { process: { terminal: boolean, args: string[] } }
        spec.process.terminal = false
        spec.process.args = COMMAND
        await writeFile(configPath, JSON.stringify(spec))
        const r = await run('runc', ['run', '--bundle', join(dir, 'bundle'), id], { timeoutMs: 120_000 })
        const t3 = performance.now()
        check42(r.stdout, 'runc run')
        pull.push({ seconds: (t3 - t0) / 1000, pull: (t1 - t0) / 1000, unpack: (t2 - t1) / 1000, run: (t3 - t2) / 1000, registryBytes: proxyStats!.bytesDown - bytesBefore })
        say(`run ${i + 1}/${runs} full pull: ${secs(pull.at(-1)!.seconds)} (skopeo ${secs(pull.at(-1)!.pull)}, umoci ${secs(pull.at(-1)!.unpack)}, runc ${secs(pull.at(-1)!.run)})`)
      } finally {
        await run('runc', ['delete', '--force', id], { check: false })
        await rm(dir, { recursive: true, force: true })
      }
    }
  }

  say('tracing the files the command opens (strace, chroot in the unpacked tree)')
  const opened: OpenedFiles = await openedFiles(ctx.pythonRootfs, COMMAND, join(work, 'strace.txt'))
  if (opened.stdout.trim() !== '42') throw new Error(`the traced command printed ${JSON.stringify(opened.stdout)}`)

  const tIn = median(inProcess.map(r => r.seconds))
  const tTraced = median(inProcessTraced.map(r => r.seconds))
  const tDaemon = median(daemon.map(r => r.seconds))
  const tPull = median(pull.map(r => r.seconds))
  const originBytes = median(inProcess.map(r => r.origin.sent))
  const resolvedUncompressed = median(daemon.map(r => r.resolverOriginBytes))
  const med = (k: 'catalog' | 'pack' | 'other'): number => median(inProcess.map(r => r.origin[k]))
  results.cold = {
    command: COMMAND, rateBytesPerSecond: rate, inProcess, inProcessTraced, daemon, pull,
    opened: { bytes: opened.bytes, files: opened.files.length, unresolved: opened.unresolved, list: opened.files },
    image: { uncompressedTarBytes: uncompressedImage, compressedOciBytes: compressedImage, shoalStoredBytes: shoalStored }
  }

  const speedup = (t: number): string => Number.isFinite(tPull) ? `${(tPull / t).toFixed(1)}×` : 'n/a'
  emit(`\n### Cold start: \`${COMMAND[0]} -c '${COMMAND[2]}'\` in the python image, origin and registry at ${mbit} Mbit/s\n`)
  emit(`Median of ${runs} runs (min–max). Nothing of the image on the node beforehand; before every timed run the page cache is dropped and the tools (node and shoal's sources, skopeo, umoci, runc) are loaded again, so tools are warm and image data cold.\n`)
  emit(markdownTable(['', 'shoal run, in-process agent', 'shoal run, in-process agent, image with a prefetch list (`shoal trace`)', 'shoal run, agent daemon already up', 'full pull: skopeo copy + umoci unpack + runc'], [
    ['wall time, end to end', secs(tIn) + spread(inProcess.map(r => r.seconds), secs), secs(tTraced) + spread(inProcessTraced.map(r => r.seconds), secs),
      secs(tDaemon) + spread(daemon.map(r => r.seconds), secs), pull.length > 0 ? secs(tPull) + spread(pull.map(r => r.seconds), secs) : 'skipped'],
    ['speed-up vs full pull (aim ≥ 10×)', speedup(tIn), speedup(tTraced), speedup(tDaemon), pull.length > 0 ? '1×' : ''],
    ['bytes over the capped link', mb(originBytes, 2), mb(median(inProcessTraced.map(r => r.origin.sent)), 2), mb(median(daemon.map(r => r.origin.sent)), 2),
      pull.length > 0 ? mb(median(pull.map(r => r.registryBytes)), 2) : ''],
    ['of which: catalogs / chunk packs / manifests, config, signature', `${mb(med('catalog'), 2)} / ${mb(med('pack'), 2)} / ${mb(med('other'), 3)}`, '', '', ''],
    ['same daemon, right after: the command again (chunks cached) / `shoal run python -- true`', '', '',
      `${secs(median(daemon.map(r => r.warmSeconds)))} / ${secs(median(daemon.map(r => r.trueSeconds)))}`, ''],
    ['full pull split: skopeo copy / umoci unpack / runc run', '', '', '', pull.length > 0
      ? `${secs(median(pull.map(r => r.pull)))} / ${secs(median(pull.map(r => r.unpack)))} / ${secs(median(pull.map(r => r.run)))}`
      : '']
  ]))
  emit('')
  emit(markdownTable(['bytes', 'value', 'ratio', 'aim'], [
    ['origin bytes of the in-process shoal run (compressed chunks + catalogs + metadata)', mb(originBytes, 2), '', ''],
    [`bytes of the ${opened.files.length} regular files the command opens (strace; st_size summed)`, mb(opened.bytes, 2), `origin / opened = ${(originBytes / opened.bytes).toFixed(2)}`, '≤ 1.5'],
    ['the same, uncompressed: bytes the agent daemon resolved from the origin (its `origin` source: chunks and catalogs)', mb(resolvedUncompressed, 2), `resolved / opened = ${(resolvedUncompressed / opened.bytes).toFixed(2)}`, ''],
    ['image, uncompressed layer tars', mb(uncompressedImage), `origin / image = ${pct(originBytes / uncompressedImage, 1)}`, '≤ 10 %'],
    ['image, compressed OCI (gzip layers + config, what the full pull moves)', mb(compressedImage), `origin / image = ${pct(originBytes / compressedImage, 1)}`, '≤ 10 %'],
    ['shoal image as stored at the origin (catalogs + packs)', mb(shoalStored), `origin / stored = ${pct(originBytes / shoalStored, 1)}`, '']
  ]))
  if (opened.unresolved.length > 0) emit(`\n(${opened.unresolved.length} opens could not be resolved in the tree and are not counted: ${opened.unresolved.slice(0, 5).join(', ')})`)
  emit(`\nLargest opened files: ${opened.files.slice(0, 5).map(f => `${f.path} ${mb(f.size, 2)}`).join(', ')}.`)
}

// ---------------------------------------------------------------------------------
// 2. Throughput and IOPS

interface IoContext { work: string, images: string, pub: string, ioRootfs: string }

interface IoTest {
  name: string
  cache: string
  spec: FioSpec
  unit: 'MB/s' | 'IOPS'
  /** Read first (untimed, page cache dropped after): puts a hot set into shoal's memory cache. */
  warm?: FioSpec
}

async function benchIo (ctx: IoContext): Promise<void> {
  const { work, images, pub, ioRootfs } = ctx
  const tests: IoTest[] = [
    { name: `sequential read of the ${bigMiB} MiB file, bs=1M, 1 job`, cache: 'buffered; page cache dropped before (reads reach FUSE as ≤128 KiB readahead)', spec: { rw: 'read', bs: '1M', direct: false, numjobs: 1 }, unit: 'MB/s' },
    { name: `random 4 KiB reads, 1 job, ${fioRuntime} s`, cache: 'O_DIRECT: page cache bypassed, every read is a FUSE request', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 1, runtime: fioRuntime }, unit: 'IOPS' },
    { name: `random 4 KiB reads, 4 jobs, ${fioRuntime} s`, cache: 'O_DIRECT: page cache bypassed', spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 4, runtime: fioRuntime }, unit: 'IOPS' },
    { name: `random 4 KiB reads, 1 job, ${fioRuntime} s, buffered`, cache: 'buffered; page cache dropped before, hits grow during the run', spec: { rw: 'randread', bs: '4k', direct: false, numjobs: 1, runtime: fioRuntime }, unit: 'IOPS' },
    {
      name: `random 4 KiB reads in the first 48 MiB only (fits shoal's 64 MiB memory cache), 1 job, ${fioRuntime} s`,
      cache: 'O_DIRECT; those 48 MiB read once just before (untimed), then page cache dropped',
      spec: { rw: 'randread', bs: '4k', direct: true, numjobs: 1, runtime: fioRuntime, size: '48m' },
      unit: 'IOPS',
      warm: { rw: 'read', bs: '1M', direct: false, numjobs: 1, size: '48m' }
    }
  ]

  const squashImage = join(work, 'io.sqfs')
  say('mksquashfs of the io tree (zstd level 3)')
  const mksquashfsSeconds = await makeSquashfs(ioRootfs, squashImage)
  const agent = await startAgent(cleanup, { state: join(work, 'state-io'), origin: images, trust: pub, name: 'agent-io' })
  try {
    const shoalMount = mnt(work, 'shoal-io')
    await agent.mount('io', shoalMount)
    const squash = await mountSquashfuse(cleanup, squashImage, mnt(work, 'squashfuse-io'))
    try {
      const big = 'data/big.bin'
      const expected = (await run('sha256sum', [join(ioRootfs, big)])).stdout.split(' ')[0]
      for (const [name, dir] of [['shoal', shoalMount], ['squashfuse', squash.mountpoint]] as const) {
        say(`warming and checking ${name}: sha256sum of ${big}, cat of the small files`)
        const r = await run('sha256sum', [join(dir, big)], { timeoutMs: 600_000 })
        if (r.stdout.split(' ')[0] !== expected) throw new Error(`${name}: ${big} hashes to ${r.stdout.split(' ')[0]}, expected ${expected}`)
        await sh(`find ${q(join(dir, 'small'))} -type f -print0 | xargs -0 cat > /dev/null`)
      }
      const diskCache = (await agent.stats()).cache
      say(`shoal disk cache after warming: ${mb(diskCache.bytes)} in ${diskCache.chunks} chunks`)

      type Row = { shoal: number[], squashfuse: number[], ext4: number[], shoalFuseReads: number[], shoalOps: number[], shoalCpuPerGB: number[] }
      const rows: Row[] = tests.map(() => ({ shoal: [], squashfuse: [], ext4: [], shoalFuseReads: [], shoalOps: [], shoalCpuPerGB: [] }))
      const value = (t: IoTest, r: { bytesPerSecond: number, iops: number }): number => t.unit === 'MB/s' ? r.bytesPerSecond / 1e6 : r.iops
      for (let i = 0; i < runs; i++) {
        for (const [ti, t] of tests.entries()) {
          // Alternate who goes first; the local-disk reference only in the first run.
          const order: Array<'shoal' | 'squashfuse' | 'ext4'> = i % 2 === 0 ? ['shoal', 'squashfuse'] : ['squashfuse', 'shoal']
          if (i === 0) order.push('ext4')
          for (const system of order) {
            const dir = system === 'shoal' ? shoalMount : system === 'squashfuse' ? squash.mountpoint : ioRootfs
            if (t.warm !== undefined) await fio(join(dir, big), t.warm)
            await dropCaches()
            // A mount that went away, or a file whose size the kernel lowered, would make fio measure something else: check.
            const size = (await stat(join(dir, big))).size
            if (size !== bigMiB * 1048576) throw new Error(`${system}: stat says ${big} has ${size} bytes, not ${bigMiB * 1048576}, before "${t.name}" of run ${i + 1}`)
            const before = system === 'shoal' ? await fuseReads(agent, shoalMount) : 0
            const cpuBefore = system === 'shoal' ? await cpuSeconds(agent.daemon.child.pid!) : 0
            const r = await fio(join(dir, big), t.spec)
            rows[ti]![system].push(value(t, r))
            if (system === 'shoal') {
              // The agent's own CPU (all its threads: JS, libuv's pool, FUSE), per GB that fio read.
              rows[ti]!.shoalCpuPerGB.push((await cpuSeconds(agent.daemon.child.pid!) - cpuBefore) / (r.ioBytes / 1e9))
              rows[ti]!.shoalFuseReads.push(await fuseReads(agent, shoalMount) - before)
              rows[ti]!.shoalOps.push(r.ioBytes / (t.unit === 'MB/s' ? 1048576 : 4096))
            }
            say(`run ${i + 1}/${runs} ${t.name}: ${system} ${value(t, r).toFixed(0)} ${t.unit}`)
          }
        }
      }
      results.io = { tests: tests.map((t, i) => ({ ...t, ...rows[i] })), mksquashfsSeconds, diskCache }
      emit(`\n### Reads of a ${bigMiB} MiB incompressible file: shoal FUSE mount (warm disk cache) vs squashfuse\n`)
      emit(`${(await run('fio', ['--version'])).stdout.trim()}, psync, median of ${runs} runs (min–max); page cache dropped (\`echo 3 > /proc/sys/vm/drop_caches\`) before every fio run. ` +
        'shoal: agent daemon, every chunk already in its disk cache (1 MiB chunks, fetched and verified by this agent process, so read by pread without hashing again: docs/ARCHITECTURE.md, "Trust boundary"; a 64 MiB in-memory chunk LRU survives the drop). ' +
        'squashfuse 0.1.104 (libfuse3, defaults) over mksquashfs -comp zstd -Xcompression-level 3 of the umoci-unpacked tree. ext4: the same file read directly from the unpacked tree, one run, for the disk\'s ceiling.\n')
      emit(markdownTable(['test', 'page cache', 'shoal', 'squashfuse', 'shoal % of squashfuse', 'ext4, no FUSE', 'FUSE reads that reached shoal', 'agent CPU per GB read'], tests.map((t, i) => {
        const r = rows[i]!
        const fmt = (x: number): string => `${x.toFixed(0)}`
        const s = median(r.shoal)
        const f = median(r.squashfuse)
        const readsPerOp = median(r.shoalFuseReads.map((n, k) => n / r.shoalOps[k]!))
        return [t.name, t.cache, `${fmt(s)} ${t.unit}${spread(r.shoal, fmt)}`, `${fmt(f)} ${t.unit}${spread(r.squashfuse, fmt)}`, pct(s / f),
          `${fmt(median(r.ext4))} ${t.unit}`, `${median(r.shoalFuseReads).toFixed(0)} (${readsPerOp.toFixed(2)} per fio ${t.unit === 'MB/s' ? 'MiB' : 'read'})`,
          `${median(r.shoalCpuPerGB).toFixed(1)} s${spread(r.shoalCpuPerGB, x => x.toFixed(1))}`]
      })))
    } finally {
      await squash.stop()
    }
  } finally {
    await agent.stop()
  }
}

/** CPU time (user + system, all threads) process PID has used so far, from /proc/PID/stat. */
async function cpuSeconds (pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
  // Fields after the command name (which may contain spaces, so split after its closing parenthesis): utime and stime are the 12th and 13th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  // In clock ticks: sysconf(_SC_CLK_TCK) is 100 on Linux for every architecture Node runs on.
  return (Number(fields[11]) + Number(fields[12])) / 100
}

// ---------------------------------------------------------------------------------
// 3. Metadata walks and small files

interface MetaContext { work: string, images: string, pub: string, pythonRootfs: string, ioRootfs: string }

interface MetaCase { name: string, image: 'python' | 'io', script: (mount: string) => string }

async function benchMeta (ctx: MetaContext): Promise<void> {
  const { work, images, pub } = ctx
  const cases: MetaCase[] = [
    { name: 'python image: `find` (readdir only, no stat)', image: 'python', script: m => `find ${q(m)} > /dev/null` },
    { name: 'python image: `find -printf \'%s %m %U %T@\'` (an lstat per entry)', image: 'python', script: m => `find ${q(m)} -printf '%s %m %U %T@\\n' > /dev/null` },
    { name: 'python image: `find | xargs stat`', image: 'python', script: m => `find ${q(m)} -print0 | xargs -0 stat > /dev/null` },
    { name: `io image: \`cat\` of the ${SMALL_FILES} small files (1–8 KiB)`, image: 'io', script: m => `find ${q(join(m, 'small'))} -type f -print0 | xargs -0 cat > /dev/null` }
  ]
  const state = join(work, 'state-meta')
  const squashImages = { python: join(work, 'python.sqfs'), io: join(work, 'io.sqfs') }
  say('mksquashfs of the python tree (zstd level 3)')
  await makeSquashfs(ctx.pythonRootfs, squashImages.python)
  if (!only.has('io')) await makeSquashfs(ctx.ioRootfs, squashImages.io)

  const withShoal = async <T>(image: 'python' | 'io', fn: (mount: string, agent: ShoalAgent) => Promise<T>): Promise<T> => {
    const agent = await startAgent(cleanup, { state, origin: images, trust: pub, name: 'agent-meta' })
    try {
      const m = mnt(work, `shoal-${image}`)
      await agent.mount(image, m)
      return await fn(m, agent)
    } finally {
      await agent.stop()
    }
  }
  const withSquash = async <T>(image: 'python' | 'io', fn: (mount: string) => Promise<T>): Promise<T> => {
    const s = await mountSquashfuse(cleanup, squashImages[image], mnt(work, `squashfuse-${image}`))
    try { return await fn(s.mountpoint) } finally { await s.stop() }
  }

  // Same tree on both? Also fills the agent's catalog and chunk caches (the "warm node").
  say('checking both mounts list the same entries; warming the agent\'s caches')
  const count = async (m: string): Promise<number> => Number((await sh(`find ${q(m)} | wc -l`)).stdout.trim())
  const entries = await withShoal('python', async m => await count(m))
  const entriesSquash = await withSquash('python', async m => await count(m))
  if (entries !== entriesSquash) throw new Error(`shoal lists ${entries} entries of the python image, squashfuse ${entriesSquash}`)
  await withShoal('io', async m => { await sh(cases.find(c => c.image === 'io')!.script(m)) })

  const rows = cases.map(() => ({
    shoal: { cold: [] as number[], warm: [] as number[], fuse: [] as Array<{ cold: { opens: number, reads: number }, warm: { opens: number, reads: number } }> },
    squashfuse: { cold: [] as number[], warm: [] as number[] }
  }))
  for (let i = 0; i < runs; i++) {
    for (const [ci, c] of cases.entries()) {
      const order = i % 2 === 0 ? ['shoal', 'squashfuse'] as const : ['squashfuse', 'shoal'] as const
      for (const system of order) {
        const measure = async (m: string, agent?: ShoalAgent): Promise<void> => {
          // Opens and reads that reached the agent (shoal only): how much the kernel caches absorb.
          const counters = async (): Promise<{ opens: number, reads: number }> => {
            const info = agent === undefined ? undefined : (await agent.mounts()).find(x => x.mountpoint === resolve(m))
            return { opens: info?.fs.opens ?? 0, reads: info?.fs.reads ?? 0 }
          }
          const diff = (a: { opens: number, reads: number }, b: { opens: number, reads: number }): { opens: number, reads: number } => ({ opens: b.opens - a.opens, reads: b.reads - a.reads })
          await dropCaches()
          const c0 = await counters()
          const cold = (await sh(c.script(m))).seconds
          const c1 = await counters()
          const warm = (await sh(c.script(m))).seconds
          const c2 = await counters()
          rows[ci]![system].cold.push(cold)
          rows[ci]![system].warm.push(warm)
          if (system === 'shoal') rows[ci]!.shoal.fuse.push({ cold: diff(c0, c1), warm: diff(c1, c2) })
          say(`run ${i + 1}/${runs} ${c.name}: ${system} cold ${secs(cold)}, warm ${secs(warm)}`)
        }
        if (system === 'shoal') await withShoal(c.image, measure)
        else await withSquash(c.image, measure)
      }
    }
  }
  results.meta = { entries, cases: cases.map((c, i) => ({ name: c.name, script: c.script('MOUNT'), ...rows[i] })) }
  emit(`\n### Metadata walks and small files: shoal vs squashfuse\n`)
  emit(`Python image: ${entries} entries. Median of ${runs} runs (min–max). Cold: a fresh mount (shoal: a freshly started agent daemon whose disk cache ` +
    'already holds the catalogs and chunks; squashfuse: a fresh process) and the page cache, dentries and inodes dropped. Warm: the same command again right after, on the same mount. ' +
    'shoal speed as % of squashfuse = squashfuse time / shoal time.\n')
  const ms = (x: number): string => `${(x * 1000).toFixed(0)} ms`
  emit(markdownTable(['test', 'shoal cold', 'squashfuse cold', 'shoal % of squashfuse, cold', 'shoal warm', 'squashfuse warm', 'shoal % of squashfuse, warm', 'files read / FUSE reads reaching shoal, cold → warm'], cases.map((c, i) => {
    const r = rows[i]!
    const sc = median(r.shoal.cold)
    const fc = median(r.squashfuse.cold)
    const sw = median(r.shoal.warm)
    const fw = median(r.squashfuse.warm)
    const f = r.shoal.fuse.at(-1)
    return [c.name, ms(sc) + spread(r.shoal.cold, ms), ms(fc) + spread(r.squashfuse.cold, ms), pct(fc / sc), ms(sw) + spread(r.shoal.warm, ms), ms(fw) + spread(r.squashfuse.warm, ms), pct(fw / sw),
      f === undefined ? '' : `${f.cold.opens} / ${f.cold.reads} → ${f.warm.opens} / ${f.warm.reads}`]
  })))
}
