/**
 * A real image with a C compiler, for benchmarks: the `base` fixture image of
 * scripts/fixtures/debian-images.ts (Debian bookworm minbase, its layer blob as is) plus
 * one layer from `apt-get install --no-install-recommends gcc libc6-dev` in a chroot
 * of the unpacked base (umoci unpack, apt-get, umoci repack), like the fixtures'
 * python and perl images are made.
 *
 *   node benchmarks/lib/gcc-image.ts [--force]     (prints the paths as JSON)
 *
 * Cached machine-wide: /var/cache/shoal/bench-images/<key>/ (or $SHOAL_BENCH_IMAGES_CACHE),
 * <key> hashing this file's source and the base fixture's manifest digest. Built in a
 * temp dir beside it and renamed into place when complete (image.json written last);
 * a flock(2) per key makes a concurrent build wait and reuse the result. Needs root
 * (chroot) and the Debian mirror (through apt's own sources in the base image).
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { chmod, copyFile, mkdir, open, readdir, readFile, realpath, rename, rm, stat, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { join, resolve } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { Writable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { createGunzip } from 'node:zlib'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../../scripts/lib/args.ts'
import { reportErrors } from '../../scripts/lib/errors.ts'
import { mountsBelowOrAt, run, say, unmountAllBelow } from './proc.ts'

export const GCC_TAG = 'gcc'
export const GCC_PACKAGES = ['gcc', 'libc6-dev'] as const
const DEFAULT_CACHE_DIR = '/var/cache/shoal/bench-images'
const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
const LOCK_WAIT_S = 20 * 60
/** Written last into a finished entry; an entry without it is not used. */
const DONE_FILE = 'image.json'

export interface LayerInfo { digest: string, size: number, uncompressedSize: number }

export interface GccImage {
  /** OCI image layout holding tag `gcc`. */
  layoutDir: string
  /** `oci:<layoutDir>:gcc` */
  ref: string
  key: string
  manifest: string
  layers: LayerInfo[]
  /** `dpkg-query` lines of the compiler packages installed. */
  packages: string[]
}

interface EntryFile { key: string, baseManifest: string, manifest: string, layers: LayerInfo[], packages: string[], built: string, buildSeconds: number }

export async function ensureGccImage (options: { cacheDir?: string, force?: boolean, log?: (line: string) => void } = {}): Promise<GccImage> {
  const log = options.log ?? say
  const fixtures = await ensureRealFixtures({ log })
  const baseManifest = await tagDigest(fixtures.layoutDir, 'base')
  const source = await readFile(fileURLToPath(import.meta.url))
  const key = createHash('sha256').update(source).update(`\n${baseManifest}\n`).digest('hex').slice(0, 16)
  const cacheRoot = resolve(options.cacheDir ?? process.env.SHOAL_BENCH_IMAGES_CACHE ?? DEFAULT_CACHE_DIR)
  const entry = join(cacheRoot, key)
  if (options.force !== true) {
    const done = await readEntry(entry)
    if (done !== undefined) return paths(entry, done)
  }
  if (process.getuid?.() !== 0) throw new Error('building the gcc benchmark image needs root (chroot); run once as root, later runs reuse the cache')
  await mkdir(cacheRoot, { recursive: true })
  const lock = await acquireLock(join(cacheRoot, `${key}.lock`), log)
  try {
    let done = options.force === true ? undefined : await readEntry(entry)
    if (done === undefined) {
      await build({ cacheRoot: await realpath(cacheRoot), key, baseRef: fixtures.ref('base'), baseManifest, log })
      done = await readEntry(entry)
      if (done === undefined) throw new Error(`built ${entry}, but its ${DONE_FILE} is missing`)
    }
    return paths(entry, done)
  } finally {
    await lock.release()
  }
}

function paths (entry: string, done: EntryFile): GccImage {
  const layoutDir = join(entry, 'layout')
  return { layoutDir, ref: `oci:${layoutDir}:${GCC_TAG}`, key: done.key, manifest: done.manifest, layers: done.layers, packages: done.packages }
}

async function readEntry (entry: string): Promise<EntryFile | undefined> {
  try { return JSON.parse(await readFile(join(entry, DONE_FILE), 'utf8')) as EntryFile } catch { return undefined }
}

/** The manifest digest of TAG in the OCI layout LAYOUTDIR. */
export async function tagDigest (layoutDir: string, tag: string): Promise<string> {
  const index = JSON.parse(await readFile(join(layoutDir, 'index.json'), 'utf8')) as { manifests: Array<{ digest: string, annotations?: Record<string, string> }> }
  const found = index.manifests.find(m => m.annotations?.['org.opencontainers.image.ref.name'] === tag)
  if (found === undefined) throw new Error(`no tag ${tag} in ${layoutDir}`)
  return found.digest
}

/** Layer blob digests, compressed sizes and uncompressed sizes (gunzip counted) of TAG in LAYOUTDIR. */
export async function layerSizes (layoutDir: string, tag: string): Promise<{ manifest: string, config: number, layers: LayerInfo[] }> {
  const blob = (digest: string): string => join(layoutDir, 'blobs', ...digest.split(':'))
  const manifest = await tagDigest(layoutDir, tag)
  const m = JSON.parse(await readFile(blob(manifest), 'utf8')) as { config: { size: number }, layers: Array<{ digest: string, size: number, mediaType: string }> }
  const layers: LayerInfo[] = []
  for (const l of m.layers) {
    let uncompressedSize = 0
    const count = new Writable({ write (chunk: Buffer, _e, cb) { uncompressedSize += chunk.length; cb() } })
    if (l.mediaType.endsWith('+gzip') || l.mediaType.endsWith('.gzip')) await pipeline(createReadStream(blob(l.digest)), createGunzip(), count)
    else await pipeline(createReadStream(blob(l.digest)), count)
    layers.push({ digest: l.digest, size: l.size, uncompressedSize })
  }
  return { manifest, config: m.config.size, layers }
}

async function build (ctx: { cacheRoot: string, key: string, baseRef: string, baseManifest: string, log: (line: string) => void }): Promise<void> {
  const { cacheRoot, key, log } = ctx
  // We hold the key's lock: a temp dir of this key is a crashed build's leftover.
  for (const name of await readdir(cacheRoot)) {
    if (name.startsWith(`.tmp-${key}-`)) await removeTree(join(cacheRoot, name))
  }
  const tmp = join(cacheRoot, `.tmp-${key}-${process.pid}`)
  const layout = join(tmp, 'layout')
  const bundle = join(tmp, 'bundle')
  const rootfs = join(bundle, 'rootfs')
  const image = `${layout}:${GCC_TAG}`
  const started = Date.now()
  log(`building the gcc benchmark image ${key} in ${tmp}`)
  try {
    await mkdir(tmp, { recursive: true })
    // skopeo copies the base blobs as they are (same layer digest as the fixtures' images).
    await run('skopeo', ['copy', '-q', '--insecure-policy', ctx.baseRef, `oci:${image}`], { timeoutMs: 300_000 })
    await run('umoci', ['unpack', '--image', image, bundle], { timeoutMs: 300_000 })
    const env = chrootEnv()
    const resolvConf = join(rootfs, 'etc', 'resolv.conf')
    await copyFile('/etc/resolv.conf', resolvConf)
    try {
      log(`apt-get install --no-install-recommends ${GCC_PACKAGES.join(' ')} in a chroot ...`)
      await run('chroot', [rootfs, 'apt-get', 'update'], { env, timeoutMs: 600_000, stdout: 'ignore' })
      // No pty for dpkg: the chroot has no /dev/pts.
      await run('chroot', [rootfs, 'apt-get', 'install', '-y', '--no-install-recommends', '-o', 'Dpkg::Use-Pty=0', ...GCC_PACKAGES], { env, timeoutMs: 1_200_000, stdout: 'ignore' })
      await run('chroot', [rootfs, 'apt-get', 'clean'], { env, timeoutMs: 120_000 })
    } finally {
      await rm(resolvConf, { force: true })
      const lists = join(rootfs, 'var', 'lib', 'apt', 'lists')
      for (const name of await readdir(lists).catch(() => [] as string[])) await rm(join(lists, name), { recursive: true, force: true })
    }
    const packages = (await run('chroot', [rootfs, 'dpkg-query', '-W', '-f', '${Package} ${Version}\\n', 'gcc', 'gcc-12', 'cpp-12', 'binutils', 'libc6-dev'], { env, timeoutMs: 60_000 }))
      .stdout.trim().split('\n')
    // Check that the compiler works in the chroot before it goes into the image.
    const probe = await run('chroot', [rootfs, 'sh', '-c', `printf '%s\\n' '#include <stdio.h>' 'int main(void){puts("ok");return 0;}' > /tmp/p.c && cc -O2 -o /tmp/p /tmp/p.c && /tmp/p && rm /tmp/p /tmp/p.c`], { env, timeoutMs: 120_000 })
    if (probe.stdout.trim() !== 'ok') throw new Error(`the compiler probe printed ${JSON.stringify(probe.stdout)}`)
    await run('umoci', ['repack', '--image', image, `--history.created_by=apt-get install --no-install-recommends ${GCC_PACKAGES.join(' ')}`, bundle], { timeoutMs: 600_000 })
    await run('umoci', ['config', '--image', image, '--clear=config.cmd', '--config.cmd=gcc', '--config.cmd=--version'], { timeoutMs: 60_000 })
    await removeTree(bundle)
    await run('umoci', ['gc', '--layout', layout], { timeoutMs: 120_000 })
    for (const name of await readdir(join(layout, 'blobs', 'sha256'))) await chmod(join(layout, 'blobs', 'sha256', name), 0o644)
    const sizes = await layerSizes(layout, GCC_TAG)
    const done: EntryFile = { key, baseManifest: ctx.baseManifest, manifest: sizes.manifest, layers: sizes.layers, packages, built: new Date().toISOString(), buildSeconds: (Date.now() - started) / 1000 }
    await writeFile(join(tmp, DONE_FILE), JSON.stringify(done, null, 2) + '\n')
    const entry = join(cacheRoot, key)
    await removeTree(entry)
    await rename(tmp, entry)
    log(`gcc benchmark image ready in ${((Date.now() - started) / 1000).toFixed(0)} s: ${entry} (${sizes.layers.map(l => `${(l.size / 1e6).toFixed(1)} MB gzip / ${(l.uncompressedSize / 1e6).toFixed(1)} MB`).join(' + ')})`)
  } catch (err) {
    await removeTree(tmp).catch(e => { log(`could not remove ${tmp}: ${(e as Error).message}`) })
    throw new Error(`building the gcc benchmark image failed: ${err instanceof Error ? err.message : String(err)}`, { cause: err })
  }
}

function chrootEnv (): NodeJS.ProcessEnv {
  return {
    PATH,
    DEBIAN_FRONTEND: 'noninteractive',
    LC_ALL: 'C',
    ...Object.fromEntries(['http_proxy', 'https_proxy', 'no_proxy'].flatMap(name => process.env[name] === undefined ? [] : [[name, process.env[name]]]))
  }
}

/** rm -rf, after unmounting anything a killed chroot left below DIR. */
async function removeTree (dir: string): Promise<void> {
  try { await stat(dir) } catch { return }
  await unmountAllBelow(dir)
  const left = await mountsBelowOrAt(dir)
  if (left.length > 0) throw new Error(`refusing to delete ${dir}: still mounted below it: ${left.map(m => m.mountpoint).join(', ')}`)
  await rm(dir, { recursive: true, force: true })
}

/**
 * An exclusive flock(2) on PATH, taken by flock(1) on a descriptor shared with it: the
 * lock belongs to the open file, so the kernel drops it when this process closes it or dies.
 */
async function acquireLock (path: string, log: (line: string) => void): Promise<{ release: () => Promise<void> }> {
  const file = await open(path, 'a+')
  const flock = async (args: string[]): Promise<boolean> => await new Promise((resolve, reject) => {
    const child = spawn('flock', [...args, '--exclusive', '3'], { stdio: ['ignore', 'ignore', 'inherit', file.fd] })
    child.on('error', reject)
    child.on('close', code => { resolve(code === 0) })
  })
  try {
    if (!await flock(['--nonblock'])) {
      log(`waiting up to ${LOCK_WAIT_S / 60} min for another build of the gcc image (${(await readFile(path, 'utf8')).trim() || 'unknown holder'}) ...`)
      if (!await flock(['--timeout', String(LOCK_WAIT_S)])) throw new Error(`gave up waiting for ${path}`)
    }
    await file.truncate(0)
    await file.write(`pid ${process.pid} on ${hostname()} since ${new Date().toISOString()}\n`)
  } catch (err) {
    await file.close()
    throw err
  }
  return { release: async () => { await file.close() } }
}

if (import.meta.main) {
  reportErrors('gcc-image')
  const { values } = parseScriptArgs({ script: 'gcc-image', usage: 'usage: node benchmarks/lib/gcc-image.ts [--force]     (prints the paths as JSON)', options: { force: { type: 'boolean', default: false } } })
  const image = await ensureGccImage({ force: values.force })
  process.stdout.write(JSON.stringify(image, null, 2) + '\n')
}
