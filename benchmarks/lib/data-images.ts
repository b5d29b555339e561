/**
 * The synthetic images of ImageApparate's first two workloads (benchmarks/workloads.ts),
 * on the fixtures' Debian base layer (the same blob as the python and gcc images), each
 * with one data layer added by `umoci insert`:
 *
 * - `seq`: /data/big.bin, 500 MB (SEQ_BYTES) of incompressible bytes;
 * - `files`: 10,000 (FILES_IN_IMAGE) files of 4-16 KiB, incompressible, under
 *   /data/files/dNN/, and /data/read.list naming 1,000 (FILES_READ) of them in a random
 *   (seeded) order: what the workload reads.
 *
 * The bytes are AES-CTR keystreams of a fixed seed (as test/helpers/synthetic.ts makes
 * them), so every build holds the same data. Cached like the gcc image:
 * /var/cache/shoal/bench-images/<key>/ (or $SHOAL_BENCH_IMAGES_CACHE), <key> hashing this
 * file's source and the base fixture's manifest digest; built in a temp dir and renamed
 * into place when complete (image.json last). One builder at a time is assumed (no lock:
 * only this benchmark builds these). Needs root (umoci unpack keeps owners).
 *
 *   node benchmarks/lib/data-images.ts [--force]     (prints the paths as JSON)
 */
import { createCipheriv, createHash } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { chmod, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../../scripts/lib/args.ts'
import { reportErrors } from '../../scripts/lib/errors.ts'
import { layerSizes, tagDigest, type LayerInfo } from './gcc-image.ts'
import { run, say } from './proc.ts'

export const SEQ_BYTES = 500_000_000
export const FILES_IN_IMAGE = 10_000
export const FILES_READ = 1_000
export const FILE_MIN_BYTES = 4096
export const FILE_MAX_BYTES = 16384
const DEFAULT_CACHE_DIR = '/var/cache/shoal/bench-images'
const DONE_FILE = 'image.json'

export interface DataImages {
  /** OCI layout holding the tags `seq` and `files`. */
  layoutDir: string
  ref: (tag: 'seq' | 'files') => string
  key: string
  layers: Record<'seq' | 'files', LayerInfo[]>
}

interface EntryFile { key: string, baseManifest: string, layers: Record<'seq' | 'files', LayerInfo[]>, built: string, buildSeconds: number }

export async function ensureDataImages (options: { cacheDir?: string, force?: boolean, log?: (line: string) => void } = {}): Promise<DataImages> {
  const log = options.log ?? say
  const fixtures = await ensureRealFixtures({ log })
  const baseManifest = await tagDigest(fixtures.layoutDir, 'base')
  const source = await readFile(fileURLToPath(import.meta.url))
  const key = 'data-' + createHash('sha256').update(source).update(`\n${baseManifest}\n`).digest('hex').slice(0, 16)
  const cacheRoot = resolve(options.cacheDir ?? process.env.SHOAL_BENCH_IMAGES_CACHE ?? DEFAULT_CACHE_DIR)
  const entry = join(cacheRoot, key)
  let done = options.force === true ? undefined : await readEntry(entry)
  if (done === undefined) {
    if (process.getuid?.() !== 0) throw new Error('building the data images needs root; run once as root, later runs reuse the cache')
    await mkdir(cacheRoot, { recursive: true })
    await build({ cacheRoot, key, baseRef: fixtures.ref('base'), baseManifest, log })
    done = await readEntry(entry)
    if (done === undefined) throw new Error(`built ${entry}, but its ${DONE_FILE} is missing`)
  }
  const layoutDir = join(entry, 'layout')
  return { layoutDir, ref: tag => `oci:${layoutDir}:${tag}`, key, layers: done.layers }
}

async function readEntry (entry: string): Promise<EntryFile | undefined> {
  try { return JSON.parse(await readFile(join(entry, DONE_FILE), 'utf8')) as EntryFile } catch { return undefined }
}

/** A deterministic incompressible stream: the AES-128-CTR keystream of SEED. */
function keystream (seed: string): (bytes: number) => Buffer {
  const key = createHash('sha256').update(seed).digest()
  const cipher = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32))
  return bytes => cipher.update(Buffer.alloc(bytes))
}

/** A number in [0, n) from a hash of TEXT: sizes and shuffles that are the same every build. */
function hashInt (text: string, n: number): number {
  return createHash('sha256').update(text).digest().readUInt32BE(0) % n
}

async function build (ctx: { cacheRoot: string, key: string, baseRef: string, baseManifest: string, log: (line: string) => void }): Promise<void> {
  const { cacheRoot, key, log } = ctx
  for (const name of await readdir(cacheRoot)) {
    if (name.startsWith(`.tmp-${key}-`)) await rm(join(cacheRoot, name), { recursive: true, force: true })
  }
  const tmp = join(cacheRoot, `.tmp-${key}-${process.pid}`)
  const layout = join(tmp, 'layout')
  const started = Date.now()
  log(`building the data benchmark images ${key} in ${tmp}`)
  try {
    // seq: one big file.
    const seqDir = join(tmp, 'seq-data')
    await mkdir(seqDir, { recursive: true })
    const next = keystream('shoal-workload-seq')
    const out = createWriteStream(join(seqDir, 'big.bin'))
    for (let left = SEQ_BYTES; left > 0; left -= 1 << 20) {
      if (!out.write(next(Math.min(left, 1 << 20)))) await once(out, 'drain')
    }
    out.end()
    await once(out, 'finish')
    // files: FILES_IN_IMAGE small files in 100 directories, and the random list of those read.
    const filesDir = join(tmp, 'files-data')
    const names: string[] = []
    for (let i = 0; i < FILES_IN_IMAGE; i++) {
      const dir = `d${String(i % 100).padStart(2, '0')}`
      const name = `files/${dir}/f${String(i).padStart(5, '0')}.bin`
      if (i < 100) await mkdir(join(filesDir, 'files', dir), { recursive: true })
      const size = FILE_MIN_BYTES + hashInt(`size ${i}`, FILE_MAX_BYTES - FILE_MIN_BYTES + 1)
      await writeFile(join(filesDir, name), keystream(`shoal-workload-file ${i}`)(size))
      names.push(name)
    }
    const read = names.map(n => ({ n, k: hashInt(`order ${n}`, 2 ** 31) })).sort((a, b) => a.k - b.k).slice(0, FILES_READ).map(x => `/data/${x.n}`)
    await writeFile(join(filesDir, 'read.list'), read.join('\n') + '\n')

    for (const [tag, dir] of [['seq', seqDir], ['files', filesDir]] as const) {
      const image = `${layout}:${tag}`
      await run('skopeo', ['copy', '-q', '--insecure-policy', ctx.baseRef, `oci:${image}`], { timeoutMs: 300_000 })
      log(`umoci insert: ${tag} data layer`)
      await run('umoci', ['insert', '--image', image, `--history.created_by=shoal benchmark data (${tag})`, dir, '/data'], { timeoutMs: 1_200_000 })
      await rm(dir, { recursive: true, force: true })
    }
    await run('umoci', ['gc', '--layout', layout], { timeoutMs: 120_000 })
    for (const name of await readdir(join(layout, 'blobs', 'sha256'))) await chmod(join(layout, 'blobs', 'sha256', name), 0o644)
    const layers = { seq: (await layerSizes(layout, 'seq')).layers, files: (await layerSizes(layout, 'files')).layers }
    const done: EntryFile = { key, baseManifest: ctx.baseManifest, layers, built: new Date().toISOString(), buildSeconds: (Date.now() - started) / 1000 }
    await writeFile(join(tmp, DONE_FILE), JSON.stringify(done, null, 2) + '\n')
    const entry = join(cacheRoot, key)
    await rm(entry, { recursive: true, force: true })
    await rename(tmp, entry)
    log(`data benchmark images ready in ${((Date.now() - started) / 1000).toFixed(0)} s: ${entry}`)
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {})
    throw new Error(`building the data benchmark images failed: ${err instanceof Error ? err.message : String(err)}`, { cause: err })
  }
}

if (import.meta.main) {
  reportErrors('data-images')
  const { values } = parseScriptArgs({ script: 'data-images', usage: 'usage: node benchmarks/lib/data-images.ts [--force]     (prints the paths as JSON)', options: { force: { type: 'boolean', default: false } } })
  const images = await ensureDataImages({ force: values.force })
  process.stdout.write(JSON.stringify({ ...images, ref: undefined, refs: { seq: images.ref('seq'), files: images.ref('files') } }, null, 2) + '\n')
}
