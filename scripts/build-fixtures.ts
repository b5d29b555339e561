/**
 * Real image fixtures: small Debian images built without Docker (debootstrap, apt-get
 * in a chroot, umoci), cached machine-wide so that test runs after the first reuse them.
 *
 *   node scripts/build-fixtures.ts [--cache DIR] [--force] [--prune]
 *
 * One OCI image layout holds three tags:
 * - `base`:   one layer, `debootstrap --variant=minbase bookworm`;
 * - `python`: the same base layer blob + a layer adding python3;
 * - `perl`:   the same base layer blob + a layer adding perl (core modules incl. JSON::PP).
 * Beside it: `umoci unpack` bundles of python and perl (reference trees to compare
 * a converter's merged view with) and an oci-archive of python.
 *
 * Cache entry: <cache>/<key>/, where <cache> is --cache, $SHOAL_FIXTURES_CACHE or
 * /var/cache/shoal/fixtures, and <key> hashes this file's source, the Debian suite and
 * the mirror. An entry is built in a temp dir beside it and renamed into place only
 * when complete; a flock(1) lock per key makes a concurrent run wait and reuse it.
 * Needs root (debootstrap, chroot, device nodes) and network access to the mirror.
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { access, chmod, constants, copyFile, mkdir, open, readdir, readFile, realpath, rename, rm, stat, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { basename, delimiter, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { OciLayout } from '../src/oci/layout.ts'
import type { ImageManifest } from '../src/oci/types.ts'

export interface RealFixtures {
  /** The OCI image layout holding the tags base, python and perl. */
  layoutDir: string
  /** `oci:<layoutDir>:<tag>` */
  ref (tag: FixtureTag): string
  /** oci-archive of the python image (tag `python` inside). */
  archive: string
  /** rootfs directories of `umoci unpack` bundles: the reference trees. */
  unpacked: { python: string, perl: string }
  /** The cache key (also the entry's directory name). */
  key: string
}

export type FixtureTag = 'base' | 'python' | 'perl'

export interface FixtureOptions {
  /** Cache root; default $SHOAL_FIXTURES_CACHE or /var/cache/shoal/fixtures. */
  cacheDir?: string
  signal?: AbortSignal
  /** Progress lines; default: stderr. */
  log?: (line: string) => void
  /** Rebuild even if a complete entry exists. */
  force?: boolean
  /** Delete cache entries of other keys (older versions of this script). */
  prune?: boolean
}

const SUITE = 'bookworm'
const FALLBACK_MIRROR = 'http://deb.debian.org/debian'
const DEFAULT_CACHE_DIR = '/var/cache/shoal/fixtures'
const LOCK_WAIT_MS = 15 * 60_000
const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
const TOOLS = ['debootstrap', 'umoci', 'skopeo', 'chroot', 'flock', 'umount']
/** Written last into a finished entry; an entry without it is not used. */
const MANIFEST_FILE = 'fixtures.json'

const IMAGES = {
  python: { packages: ['python3'], cmd: ['python3'] },
  perl: { packages: ['perl'], cmd: ['perl', '-v'] }
} as const

export async function ensureRealFixtures (options: FixtureOptions = {}): Promise<RealFixtures> {
  const log = options.log ?? ((line: string) => { process.stderr.write(`[fixtures] ${line}\n`) })
  const cacheRoot = resolve(options.cacheDir ?? process.env.SHOAL_FIXTURES_CACHE ?? DEFAULT_CACHE_DIR)
  const mirror = await debianMirror()
  const key = await cacheKey(mirror)
  const entry = join(cacheRoot, key)

  if (options.force !== true && await isComplete(entry)) {
    log(`using cached fixtures ${entry}`)
    if (options.prune === true) await prune(cacheRoot, key, log)
    return entryPaths(entry, key)
  }
  await checkPrerequisites()
  await mkdir(cacheRoot, { recursive: true })
  const lock = await acquireLock(join(cacheRoot, `${key}.lock`), log, options.signal)
  try {
    // Whoever held the lock before us may have just built it.
    if (options.force === true || !await isComplete(entry)) {
      await build({ cacheRoot: await realpath(cacheRoot), key, mirror, log, signal: options.signal })
    }
    if (options.prune === true) await prune(cacheRoot, key, log)
  } finally {
    await lock.release()
  }
  return entryPaths(entry, key)
}

function entryPaths (entry: string, key: string): RealFixtures {
  const layoutDir = join(entry, 'layout')
  return {
    layoutDir,
    ref: tag => `oci:${layoutDir}:${tag}`,
    archive: join(entry, 'python.oci.tar'),
    unpacked: { python: join(entry, 'unpacked', 'python', 'rootfs'), perl: join(entry, 'unpacked', 'perl', 'rootfs') },
    key
  }
}

async function isComplete (entry: string): Promise<boolean> {
  try { await stat(join(entry, MANIFEST_FILE)); return true } catch { return false }
}

async function cacheKey (mirror: string): Promise<string> {
  const source = await readFile(fileURLToPath(import.meta.url))
  return createHash('sha256').update(source).update(`\n${SUITE}\n${mirror}\n`).digest('hex').slice(0, 16)
}

// ---------------------------------------------------------------------------------
// The build

interface BuildContext {
  cacheRoot: string
  key: string
  mirror: string
  log: (line: string) => void
  signal: AbortSignal | undefined
}

async function build (ctx: BuildContext): Promise<void> {
  const { cacheRoot, key, log } = ctx
  // We hold the key's lock, so any temp dir of this key is a crashed build's leftover.
  for (const name of await readdir(cacheRoot)) {
    if (name.startsWith(`.tmp-${key}-`)) await removeTree(join(cacheRoot, name))
  }
  const tmp = join(cacheRoot, `.tmp-${key}-${process.pid}`)
  const logs = join(tmp, 'logs')
  await mkdir(logs, { recursive: true })
  const layout = join(tmp, 'layout')
  const work = join(tmp, 'work')
  const started = Date.now()
  log(`building fixtures ${key} in ${tmp} (Debian ${SUITE} from ${ctx.mirror}); logs in ${logs}`)

  try {
    const base = runner(ctx, join(logs, 'base.log'))
    await stage(log, 'base: debootstrap + repack', async () => {
      await base('umoci', ['init', '--layout', layout])
      await base('umoci', ['new', '--image', `${layout}:base`])
      await base('umoci', ['config', '--image', `${layout}:base`, '--architecture', 'amd64', '--os', 'linux',
        '--clear=config.env', `--config.env=PATH=${PATH}`, '--config.workingdir=/', '--clear=config.cmd', '--config.cmd=/bin/bash'])
      await base('umoci', ['unpack', '--image', `${layout}:base`, join(work, 'base')])
      const rootfs = join(work, 'base', 'rootfs')
      await base('debootstrap', ['--variant=minbase', SUITE, rootfs, ctx.mirror], { timeoutMs: 20 * 60_000 })
      // debootstrap leaves its downloads and the host's resolv.conf and hostname
      // behind; images ship without them (a runtime provides its own /etc files).
      await base('chroot', [rootfs, 'apt-get', 'clean'], { env: chrootEnv() })
      await emptyDir(join(rootfs, 'var', 'lib', 'apt', 'lists'))
      await rm(join(rootfs, 'etc', 'resolv.conf'), { force: true })
      await rm(join(rootfs, 'etc', 'hostname'), { force: true })
      await base('umoci', ['repack', '--image', `${layout}:base`, `--history.created_by=debootstrap --variant=minbase ${SUITE}`, join(work, 'base')])
    })
    await removeTree(join(work, 'base'))

    // Both images start from the base manifest, so both reuse its layer blob as is.
    const names = Object.keys(IMAGES) as Array<keyof typeof IMAGES>
    await stage(log, `unpack base for ${names.join(', ')}`, async () => {
      await settleAll(names.map(name => runner(ctx, join(logs, `${name}.log`))('umoci', ['unpack', '--image', `${layout}:base`, join(work, name)])))
    })
    await stage(log, `apt-get install in chroots: ${names.join(', ')}`, async () => {
      await settleAll(names.map(async name => {
        await stage(log, `${name}: apt-get install ${IMAGES[name].packages.join(' ')}`, async () => {
          await aptInstall(runner(ctx, join(logs, `${name}.log`)), join(work, name, 'rootfs'), IMAGES[name].packages)
        })
      }))
    })
    await stage(log, 'repack python and perl', async () => {
      for (const name of names) {
        const run = runner(ctx, join(logs, `${name}.log`))
        await run('umoci', ['repack', '--image', `${layout}:${name}`, `--history.created_by=apt-get install --no-install-recommends ${IMAGES[name].packages.join(' ')}`, join(work, name)])
        await run('umoci', ['config', '--image', `${layout}:${name}`, '--clear=config.cmd', ...IMAGES[name].cmd.map(arg => `--config.cmd=${arg}`)])
      }
    })
    await removeTree(work)

    const finish = runner(ctx, join(logs, 'finish.log'))
    // umoci config and repack leave the manifests and configs they replaced behind.
    await finish('umoci', ['gc', '--layout', layout])
    // umoci writes blobs 0600; tests that do not run as root may read the cached images.
    for (const name of await readdir(join(layout, 'blobs', 'sha256'))) await chmod(join(layout, 'blobs', 'sha256', name), 0o644)
    const manifests = await verifySharedBase(layout)
    await stage(log, 'reference trees (umoci unpack) and python oci-archive', async () => {
      await settleAll([
        ...names.map(name => finish('umoci', ['unpack', '--image', `${layout}:${name}`, join(tmp, 'unpacked', name)])),
        finish('skopeo', ['copy', '--insecure-policy', `oci:${layout}:python`, `oci-archive:${join(tmp, 'python.oci.tar')}:python`])
      ])
    })
    await writeFile(join(tmp, MANIFEST_FILE), JSON.stringify({
      key: ctx.key, suite: SUITE, mirror: ctx.mirror, built: new Date().toISOString(), buildSeconds: (Date.now() - started) / 1000, manifests
    }, null, 2) + '\n')

    const entry = join(cacheRoot, key)
    const old = join(cacheRoot, `.old-${key}-${process.pid}`)
    const replacing = await exists(entry)
    if (replacing) await rename(entry, old)
    await rename(tmp, entry)
    if (replacing) await removeTree(old)
    log(`fixtures ${key} ready in ${seconds(started)}: ${entry}`)
  } catch (err) {
    // Keep the logs where the next run's cleanup will not delete them.
    const kept = join(cacheRoot, `${key}.failed-logs`)
    await rm(kept, { recursive: true, force: true })
    await rename(logs, kept).catch(() => {})
    await removeTree(tmp)
    const reason = err instanceof Error ? err.message : String(err)
    throw new Error(`building the real image fixtures failed: ${reason}\n(full logs: ${kept})`, { cause: err })
  }
}

/**
 * Installs PACKAGES into ROOTFS with the rootfs's own apt. The base holds no apt
 * indexes or downloads, and neither does what this leaves behind, so the new layer
 * holds the packages and dpkg's bookkeeping, and no whiteouts.
 */
async function aptInstall (run: Run, rootfs: string, packages: readonly string[]): Promise<void> {
  const env = chrootEnv()
  const resolvConf = join(rootfs, 'etc', 'resolv.conf')
  await copyFile('/etc/resolv.conf', resolvConf)
  try {
    await run('chroot', [rootfs, 'apt-get', 'update'], { env })
    // No pty for dpkg: the chroot has no /dev/pts, and nothing here needs one.
    await run('chroot', [rootfs, 'apt-get', 'install', '-y', '--no-install-recommends', '-o', 'Dpkg::Use-Pty=0', ...packages], { env })
    await run('chroot', [rootfs, 'apt-get', 'clean'], { env })
  } finally {
    await rm(resolvConf, { force: true })
    await emptyDir(join(rootfs, 'var', 'lib', 'apt', 'lists'))
  }
}

function chrootEnv (): NodeJS.ProcessEnv {
  return {
    PATH,
    DEBIAN_FRONTEND: 'noninteractive',
    LC_ALL: 'C',
    // Whatever proxy the host uses to reach the mirror, the chroot needs too.
    ...Object.fromEntries(['http_proxy', 'https_proxy', 'no_proxy'].flatMap(name => process.env[name] === undefined ? [] : [[name, process.env[name]]]))
  }
}

async function emptyDir (dir: string): Promise<void> {
  for (const name of await readdir(dir)) await rm(join(dir, name), { recursive: true, force: true })
}

/** The python and perl manifests must start with the base layer blob itself. */
async function verifySharedBase (layoutDir: string): Promise<Record<FixtureTag, string>> {
  const layout = await OciLayout.open(layoutDir)
  const tags = await layout.tags()
  const read = async (tag: FixtureTag): Promise<ImageManifest> => {
    const descriptor = tags.get(tag)
    if (descriptor === undefined) throw new Error(`tag ${tag} is missing from ${layoutDir}`)
    return await layout.readJson<ImageManifest>(descriptor.digest, `${tag} manifest`)
  }
  const [base, python, perl] = await Promise.all([read('base'), read('python'), read('perl')])
  const baseLayer = base.layers[0]?.digest
  for (const [tag, manifest] of [['python', python], ['perl', perl]] as const) {
    if (base.layers.length !== 1 || manifest.layers.length !== 2 || manifest.layers[0]!.digest !== baseLayer) {
      throw new Error(`the ${tag} image does not share the base layer: base has [${base.layers.map(l => l.digest).join(', ')}], ` +
        `${tag} has [${manifest.layers.map(l => l.digest).join(', ')}]; expected ${tag} = [base layer, one new layer]`)
    }
  }
  return { base: tags.get('base')!.digest, python: tags.get('python')!.digest, perl: tags.get('perl')!.digest }
}

async function checkPrerequisites (): Promise<void> {
  if (process.getuid?.() !== 0) {
    throw new Error('building the real image fixtures needs root (debootstrap, chroot, device nodes); run `sudo node scripts/build-fixtures.ts` once, later runs reuse the cache')
  }
  const dirs = (process.env.PATH ?? PATH).split(delimiter)
  const missing: string[] = []
  for (const tool of TOOLS) {
    const found = await Promise.any(dirs.map(async dir => { await access(join(dir, tool), constants.X_OK) })).then(() => true, () => false)
    if (!found) missing.push(tool)
  }
  if (missing.length > 0) throw new Error(`missing tools: ${missing.join(', ')} (Debian: apt-get install debootstrap umoci skopeo util-linux coreutils)`)
}

/**
 * The Debian mirror this machine's apt uses for SUITE (deb822 *.sources or one-line
 * *.list), so that the build works wherever apt works; else deb.debian.org.
 */
export async function debianMirror (): Promise<string> {
  const dir = '/etc/apt/sources.list.d'
  const files = ['/etc/apt/sources.list', ...(await readdir(dir).catch(() => [])).map(name => join(dir, name))]
  for (const file of files) {
    const text = await readFile(file, 'utf8').catch(() => '')
    const lines = text.split('\n').filter(line => !line.trimStart().startsWith('#'))
    if (file.endsWith('.sources')) {
      for (const stanza of lines.join('\n').split(/\n\s*\n/)) {
        const field = (name: string): string[] => (new RegExp(`^${name}:(.*)$`, 'mi').exec(stanza)?.[1] ?? '').trim().split(/\s+/)
        if (field('Types').includes('deb') && field('Suites').includes(SUITE) && field('Enabled')[0] !== 'no') {
          const uri = field('URIs').find(isHttp)
          if (uri !== undefined) return uri.replace(/\/+$/, '')
        }
      }
    } else if (file.endsWith('.list')) {
      for (const line of lines) {
        const match = /^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line)
        if (match !== null && match[2] === SUITE && isHttp(match[1]!)) return match[1]!.replace(/\/+$/, '')
      }
    }
  }
  return FALLBACK_MIRROR
}

function isHttp (uri: string): boolean {
  return /^https?:\/\//.test(uri)
}

async function prune (cacheRoot: string, key: string, log: (line: string) => void): Promise<void> {
  for (const name of await readdir(cacheRoot)) {
    const stale = /^[0-9a-f]{16}$/.test(name) || /^[0-9a-f]{16}\.failed-logs$/.test(name) || name.startsWith('.old-')
    if (stale && !name.startsWith(key)) {
      log(`pruning ${join(cacheRoot, name)}`)
      await removeTree(join(cacheRoot, name))
    }
  }
}

// ---------------------------------------------------------------------------------
// Processes, logs, stages

type Run = (command: string, args: string[], options?: { env?: NodeJS.ProcessEnv, timeoutMs?: number }) => Promise<void>

/**
 * A function running commands with stdout and stderr appended to LOGFILE. A failure
 * names the command, says why (exit status, timeout, cancelled) and quotes the end
 * of that command's output.
 */
function runner (ctx: BuildContext, logFile: string): Run {
  return async (command, args, options = {}) => {
    const timeoutMs = options.timeoutMs ?? 10 * 60_000
    const signal = AbortSignal.any([AbortSignal.timeout(timeoutMs), ...(ctx.signal === undefined ? [] : [ctx.signal])])
    const line = [command, ...args].join(' ')
    const out = await open(logFile, 'a')
    let result: { code: number | null, signal: NodeJS.Signals | null, error?: Error }
    let outputStart: number
    try {
      await out.write(`\n$ ${line}\n`)
      outputStart = (await out.stat()).size
      result = await new Promise(resolve => {
        const child = spawn(command, args, { stdio: ['ignore', out.fd, out.fd], env: options.env ?? process.env, signal })
        // After an abort the child still gets to exit (debootstrap unmounts on SIGTERM).
        child.on('error', error => { if (child.pid === undefined) resolve({ code: null, signal: null, error }) })
        child.on('close', (code, killedBy) => { resolve({ code, signal: killedBy }) })
      })
    } finally {
      await out.close()
    }
    if (result.code === 0) return
    const why = result.error !== undefined
      ? result.error.message
      : ctx.signal?.aborted === true ? 'cancelled' : signal.aborted ? `timed out after ${timeoutMs / 1000} s` : `exited with ${result.code ?? result.signal}`
    throw new Error(`\`${line}\` ${why}; its last output lines (${basename(logFile)}):\n${await tail(logFile, outputStart, 25)}`)
  }
}

/** The last LINES lines of FILE after byte offset FROM. */
async function tail (file: string, from: number, lines: number): Promise<string> {
  const text = (await readFile(file)).subarray(from).toString('utf8')
  return text.trimEnd().split('\n').slice(-lines).map(l => `  | ${l}`).join('\n')
}

async function stage<T> (log: (line: string) => void, name: string, fn: () => Promise<T>): Promise<T> {
  const started = Date.now()
  log(`${name} ...`)
  const result = await fn()
  log(`${name}: done in ${seconds(started)}`)
  return result
}

function seconds (since: number): string {
  return `${((Date.now() - since) / 1000).toFixed(1)} s`
}

/**
 * Like Promise.all, but fails only after every task has ended, so that no task is
 * still writing into the temp dir while the failure cleanup deletes it.
 */
async function settleAll (tasks: Array<Promise<unknown>>): Promise<void> {
  const failure = (await Promise.allSettled(tasks)).find(result => result.status === 'rejected')
  if (failure !== undefined) throw failure.reason
}

async function exists (path: string): Promise<boolean> {
  try { await stat(path); return true } catch { return false }
}

// ---------------------------------------------------------------------------------
// Locking and safe deletion

/**
 * An exclusive flock(2) on PATH, taken by flock(1) on a descriptor we share with it:
 * the lock belongs to the open file, so it stays ours after flock(1) exits and the
 * kernel drops it when this process closes the file or dies. No stale locks.
 */
async function acquireLock (path: string, log: (line: string) => void, signal: AbortSignal | undefined): Promise<{ release: () => Promise<void> }> {
  const file = await open(path, 'a+')
  const flock = async (args: string[]): Promise<boolean> => await new Promise((resolve, reject) => {
    const child = spawn('flock', [...args, '--exclusive', '3'], { stdio: ['ignore', 'ignore', 'inherit', file.fd], signal })
    child.on('error', reject)
    child.on('close', code => { resolve(code === 0) })
  })
  try {
    if (!await flock(['--nonblock'])) {
      const holder = (await readFile(path, 'utf8')).trim() || 'unknown holder'
      log(`waiting up to ${LOCK_WAIT_MS / 60_000} min for another build of these fixtures (${holder}) ...`)
      if (!await flock(['--timeout', String(LOCK_WAIT_MS / 1000)])) {
        throw new Error(`gave up after ${LOCK_WAIT_MS / 60_000} min waiting for ${path} (held by ${holder}); if that build is stuck, stop it`)
      }
    }
    await file.truncate(0)
    await file.write(`pid ${process.pid} on ${hostname()} since ${new Date().toISOString()}\n`)
  } catch (err) {
    await file.close()
    throw err
  }
  return { release: async () => { await file.close() } }
}

/**
 * rm -rf that first unmounts whatever a killed debootstrap or chroot left mounted
 * below DIR (proc, a bind-mounted /dev): deleting through such a mount would delete
 * the host's files.
 */
async function removeTree (dir: string): Promise<void> {
  let real: string
  try { real = await realpath(dir) } catch { return }
  for (const mountPoint of await mountsBelow(real)) {
    await new Promise<void>(resolve => {
      spawn('umount', ['--lazy', mountPoint], { stdio: 'ignore' }).on('close', () => { resolve() }).on('error', () => { resolve() })
    })
  }
  const left = await mountsBelow(real)
  if (left.length > 0) throw new Error(`refusing to delete ${dir}: still mounted below it: ${left.join(', ')}; unmount them by hand`)
  await rm(real, { recursive: true, force: true })
}

/** Mount points at or below DIR, deepest first. */
async function mountsBelow (dir: string): Promise<string[]> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  return mountinfo.split('\n')
    .map(line => line.split(' ')[4])
    .filter((field): field is string => field !== undefined)
    .map(field => field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))))
    .filter(mountPoint => mountPoint === dir || mountPoint.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length)
}

// ---------------------------------------------------------------------------------
// Command line

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      cache: { type: 'string' },
      force: { type: 'boolean', default: false },
      prune: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false }
    }
  })
  if (values.help) {
    process.stdout.write('usage: node scripts/build-fixtures.ts [--cache DIR] [--force] [--prune]\n' +
      'Builds (or finds in the cache) the real Debian-based OCI image fixtures and prints their paths as JSON.\n')
  } else {
    const controller = new AbortController()
    process.once('SIGINT', () => { controller.abort() })
    process.once('SIGTERM', () => { controller.abort() })
    try {
      const fixtures = await ensureRealFixtures({ cacheDir: values.cache, force: values.force, prune: values.prune, signal: controller.signal })
      const { ref, ...paths } = fixtures
      process.stdout.write(JSON.stringify({ ...paths, refs: { base: ref('base'), python: ref('python'), perl: ref('perl') } }, null, 2) + '\n')
    } catch (err) {
      process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`)
      process.exitCode = 1
    }
  }
}
