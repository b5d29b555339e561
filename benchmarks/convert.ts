/**
 * Conversion benchmark: shoal convert vs the floor of `gzip -dc LAYER | sha256sum` on
 * the same layers, in the same run. Also peak RSS and the dedup figures of
 * converting python then perl (which share the base layer) into one layout.
 *
 *   node benchmarks/convert.ts [--runs 3]
 *
 * Prints a Markdown table (for docs/BENCHMARKS.md) and writes results/convert.json.
 */
import { execFile } from 'node:child_process'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { OciLayout } from '../src/oci/layout.ts'
import type { ImageManifest } from '../src/oci/types.ts'

const execFileAsync = promisify(execFile)
reportErrors('convert')
const runs = parseScriptArgs({ script: 'convert', usage: 'usage: node benchmarks/convert.ts [--runs 3]', options: { runs: { type: 'string', default: '3' } } }).int('runs', { min: 1 })

const fixtures = await ensureRealFixtures({ log: () => {} })
const layout = await OciLayout.open(fixtures.layoutDir)
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

/** Seconds for `gzip -dc | sha256sum` over every layer of TAG, and the uncompressed bytes. */
async function floor (tag: string): Promise<{ seconds: number, bytes: number }> {
  const manifest = await layout.readJson<ImageManifest>((await layout.resolveTag(tag)).digest, 'manifest')
  const paths = manifest.layers.map(l => layout.blobPath(l.digest))
  const script = `for f in "$@"; do gzip -dc "$f" | tee >(wc -c >&2) | sha256sum >/dev/null; done`
  const started = process.hrtime.bigint()
  const { stderr } = await execFileAsync('bash', ['-c', script, 'floor', ...paths])
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  const bytes = stderr.trim().split(/\s+/).map(Number).reduce((a, b) => a + b, 0)
  return { seconds, bytes }
}

interface ConvertRun { seconds: number, inputBytes: number, maxRssBytes: number, report: { layers: Array<{ written: { chunks: number, bytes: number }, sharedWithExisting: { chunks: number, bytes: number }, dedupInLayer: { chunks: number, bytes: number }, storedBytes: number, contentBytes: number }> } }

/** Runs one conversion in a fresh Node process, so its peak RSS is its own. */
async function convert (tag: string, dest: string, compression: string): Promise<ConvertRun> {
  const code = `
    import { convertImage } from ${JSON.stringify(join(import.meta.dirname, '..', 'src', 'convert', 'convert.ts'))}
    import { generateKeyPairSync } from 'node:crypto'
    const r = await convertImage({ source: process.argv[1], dest: process.argv[2], compression: process.argv[3], signingKey: generateKeyPairSync('ed25519').privateKey })
    console.log(JSON.stringify({ seconds: r.seconds, inputBytes: r.inputBytes, maxRssBytes: process.resourceUsage().maxRSS * 1024, report: r }))`
  const { stdout } = await execFileAsync(process.execPath, ['--input-type=module', '-e', code, fixtures.ref(tag as 'python'), `oci:${dest}:${tag}`, compression], { maxBuffer: 64 << 20 })
  return JSON.parse(stdout) as ConvertRun
}

const work = await mkdtemp(join(tmpdir(), 'shoal-bench-convert-'))
const rows: string[] = []
const results: Record<string, unknown> = {}
try {
  for (const compression of ['zstd', 'none']) {
    const floors: number[] = []
    const times: number[] = []
    let last: ConvertRun | undefined
    let bytes = 0
    for (let i = 0; i < runs; i++) {
      const f = await floor('python')
      floors.push(f.seconds)
      bytes = f.bytes
      const dest = join(work, `${compression}-${i}`)
      last = await convert('python', dest, compression)
      times.push(last.seconds)
      await rm(dest, { recursive: true, force: true })
    }
    const floorMBs = bytes / 1e6 / median(floors)
    const shoalMBs = last!.inputBytes / 1e6 / median(times)
    results[compression] = { floorSeconds: floors, convertSeconds: times, inputBytes: last!.inputBytes, floorMBs, shoalMBs, ratio: shoalMBs / floorMBs, maxRssBytes: last!.maxRssBytes }
    rows.push(`| python (2 layers), chunks ${compression} | ${(last!.inputBytes / 1e6).toFixed(0)} MB | ${floorMBs.toFixed(0)} MB/s | ${shoalMBs.toFixed(0)} MB/s | ${(shoalMBs / floorMBs * 100).toFixed(0)} % | ${(last!.maxRssBytes / 2 ** 20).toFixed(0)} MiB | ${(last!.report.layers.reduce((n, l) => n + l.storedBytes, 0) / 1e6).toFixed(0)} MB |`)
  }

  // Dedup: python, then perl into the same layout.
  const dest = join(work, 'dedup')
  await mkdir(dest)
  const python = await convert('python', dest, 'zstd')
  const perl = await convert('perl', dest, 'zstd')
  const sum = (r: ConvertRun, k: 'written' | 'sharedWithExisting' | 'dedupInLayer'): { chunks: number, bytes: number } =>
    r.report.layers.reduce((a, l) => ({ chunks: a.chunks + l[k].chunks, bytes: a.bytes + l[k].bytes }), { chunks: 0, bytes: 0 })
  results.dedup = { python: { written: sum(python, 'written'), inLayer: sum(python, 'dedupInLayer') }, perl: { written: sum(perl, 'written'), shared: sum(perl, 'sharedWithExisting') } }

  console.log(`Conversion, median of ${runs} runs, floor = gzip -dc LAYER | sha256sum over the same layers in the same run\n`)
  console.log('| image | uncompressed input | floor | shoal convert | shoal / floor | peak RSS | stored |')
  console.log('|---|---|---|---|---|---|---|')
  for (const r of rows) console.log(r)
  const mb = (b: number): string => `${(b / 1e6).toFixed(1)} MB`
  console.log(`\nDedup: python wrote ${sum(python, 'written').chunks} chunks (${mb(sum(python, 'written').bytes)}), ${sum(python, 'dedupInLayer').chunks} repeated chunks inside layers (${mb(sum(python, 'dedupInLayer').bytes)}); ` +
    `perl then reused ${sum(perl, 'sharedWithExisting').chunks} chunks (${mb(sum(perl, 'sharedWithExisting').bytes)}) from python and wrote ${sum(perl, 'written').chunks} (${mb(sum(perl, 'written').bytes)}).`)
  await mkdir(join(import.meta.dirname, '..', 'results'), { recursive: true })
  await writeFile(join(import.meta.dirname, '..', 'results', 'convert.json'), JSON.stringify({ date: new Date().toISOString(), runs, results }, null, 2))
} finally {
  await rm(work, { recursive: true, force: true })
}
