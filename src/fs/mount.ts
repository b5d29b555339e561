import Fuse from 'fuse-native'
import { execFile } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { dirname, resolve } from 'node:path'
import { errorText, silentLogger, type Logger } from '../util/log.ts'
import type { ChunkResolver, ServedHook } from '../fetch/resolver.ts'
import type { MergedView } from '../image/merged-view.ts'
import { MountError } from './errors.ts'
import { ImageFs, type ImageFsStats } from './image-fs.ts'
import { cleanStaleMount, isFuseMount } from './stale-mount.ts'

/**
 * Mounts an image read-only with FUSE (fuse-native over libfuse2's high-level
 * API, in this process). Options and why:
 *
 * - `ro`: the kernel refuses every write (EROFS) before it reaches us.
 * - `use_ino`: without it libfuse invents inode numbers, and hard links would
 *   not share st_ino. fuse-native has no option for it (nor for `ro` or
 *   `negative_timeout`), but it joins options with commas, so they ride on
 *   the value of `subtype`.
 * - entry, attribute and negative timeouts of an hour, and `kernel_cache`
 *   (page cache kept across opens): the image never changes, so whatever the
 *   kernel has cached stays true, and warm metadata never leaves the kernel.
 * - `default_permissions`: the kernel checks mode bits, as on any filesystem.
 * - `allow_other` (default): containers run as other users than the agent.
 *
 * The process serving the mount must never touch it with synchronous IO: the
 * event loop that would answer the request is the one blocked waiting for it.
 * Even async reads of the mount from this process are risky under load: they
 * occupy libuv's thread pool, which the disk cache needs to answer them.
 */

export interface MountImageOptions {
  mountpoint: string
  view: MergedView
  resolver: ChunkResolver
  /** Unmounts when aborted. */
  signal?: AbortSignal
  log?: Logger
  /** Let users other than the mounting one in (needs root or user_allow_other). Default true. */
  allowOther?: boolean
  /** Most chunks prefetched ahead of a sequential reader. Default 8. */
  readaheadChunks?: number
  /** See ImageFsOptions.onRead. */
  onRead?: (path: string, offset: number, length: number) => void
  /** See ImageFsOptions.onServed. */
  onServed?: ServedHook
  /** Catalogs (all layers together) up to this size are read into memory at mount (Catalog.preload). Default MOUNT_DEFAULTS. */
  preloadCatalogBytes?: number
}

export const MOUNT_DEFAULTS = {
  /**
   * A typical image's catalogs are a few MB (the python image's two: 1.2 MB for 8,238
   * entries); reading them whole at mount, sequentially, costs a few ms and spares the
   * first walk or container start a random disk read per B-tree page. An image whose
   * catalogs are larger than this is read on demand as before.
   */
  preloadCatalogBytes: 64 * 1024 * 1024
} as const

export interface MountedImage {
  readonly mountpoint: string
  readonly stats: ImageFsStats
  /**
   * Lazily unmounts (processes with open files keep them until they close them) and
   * fails pending reads. Idempotent. A mount that someone else already unmounted
   * (`fusermount -u`, `umount -l`) counts as unmounted: fusermount's complaint about it
   * is logged, and the FUSE session's handle is released either way, so it cannot
   * keep the process alive.
   */
  unmount (): Promise<void>
}

/** How long the kernel may take to send INIT after the mount call. */
const MOUNT_TIMEOUT_MS = 10_000
/**
 * How long fusermount may take to detach the mount. It never waits on our own
 * filesystem (a lazy unmount), but it takes the kernel's mount lock, which a busy
 * host can hold for seconds: CI once saw a 10 s limit expire (issue 14's run).
 */
const UNMOUNT_TIMEOUT_MS = 30_000
/** The kernel (and `stat`) cache entries, attributes and negative lookups this long (s). */
const CACHE_TIMEOUT_S = 3600
/**
 * fuse-native's own unmount runs `fusermount -uz "PATH"` through a shell. ImageFuse
 * replaces it with a shell-free one; the check stays for fuse-native's other shell
 * call (its forced-open cleanup): keep PATH free of what a shell expands inside double quotes.
 */
const SHELL_UNSAFE_RE = /["$`\\]/

export async function mountImage (options: MountImageOptions): Promise<MountedImage> {
  const mountpoint = resolve(options.mountpoint)
  const log = options.log ?? silentLogger
  if (SHELL_UNSAFE_RE.test(mountpoint)) throw new MountError(`mount point ${mountpoint} contains one of " $ \` \\; choose a path without them`)
  if (Buffer.byteLength(mountpoint) >= 1024) throw new MountError(`mount point ${mountpoint} is longer than the 1023 bytes fuse-native accepts`)
  options.signal?.throwIfAborted()

  if (await cleanStaleMount(mountpoint, { signal: options.signal })) log.warn({ mountpoint }, 'removed a stale FUSE mount')
  await mkdir(mountpoint, { recursive: true })
  preloadCatalogs(options.view, options.preloadCatalogBytes ?? MOUNT_DEFAULTS.preloadCatalogBytes, log)

  const lifetime = new AbortController()
  const fs = new ImageFs({ view: options.view, resolver: options.resolver, log, signal: lifetime.signal, readaheadChunks: options.readaheadChunks, onRead: options.onRead, onServed: options.onServed })
  const fuse = new ImageFuse(mountpoint, fs, {
    // fuse-native answers ETIMEDOUT itself after this; the resolver's own
    // deadline must fire first, so that a stuck read becomes an EIO we chose.
    timeout: options.resolver.timeoutMs + 5_000,
    fsname: 'shoal',
    subtype: `shoal,ro,use_ino,negative_timeout=${CACHE_TIMEOUT_S}`,
    allowOther: options.allowOther ?? true,
    defaultPermissions: true,
    kernelCache: true,
    entryTimeout: CACHE_TIMEOUT_S,
    attrTimeout: CACHE_TIMEOUT_S
  })

  try {
    await callbackWithDeadline(cb => fuse.mount(cb), MOUNT_TIMEOUT_MS, options.signal)
  } catch (err) {
    lifetime.abort()
    // The kernel mount may exist even though INIT never came back.
    await cleanStaleMount(mountpoint).catch(() => {})
    if (options.signal?.aborted === true) throw options.signal.reason
    throw new MountError(`cannot mount FUSE at ${mountpoint}: ${errorText(err)} (is /dev/fuse present and fuse installed? allow_other needs root or user_allow_other in /etc/fuse.conf)`, { cause: err })
  }
  log.info({ mountpoint, layers: options.view.catalogs.length }, 'image mounted')

  let unmounting: Promise<void> | undefined
  const unmount = (): Promise<void> => {
    unmounting ??= (async () => {
      lifetime.abort(new MountError(`${mountpoint} was unmounted`))
      fs.closeAll()
      const started = performance.now()
      try {
        // fusermount's own limit fires first, so its error (not ours) names what hung.
        await callbackWithDeadline(cb => fuse.unmount(cb), UNMOUNT_TIMEOUT_MS + 5_000)
      } catch (err) {
        throw new MountError(`cannot unmount ${mountpoint}: ${errorText(err)} (unmount it by hand: fusermount -uz ${mountpoint})`, { cause: err })
      }
      const tookMs = Math.round(performance.now() - started)
      if (tookMs > 2_000) log.warn({ mountpoint, tookMs }, 'unmounting was slow (fusermount waited for the kernel)')
      if (fuse.goneBefore !== undefined) log.warn({ mountpoint, fusermount: fuse.goneBefore }, 'the mount had already been unmounted by someone else')
      log.info({ mountpoint, ...fs.stats }, 'image unmounted')
    })()
    return unmounting
  }
  options.signal?.addEventListener('abort', () => {
    unmount().catch((err: unknown) => log.error({ mountpoint, err: errorText(err) }, 'unmount failed'))
  }, { once: true })

  return { mountpoint, stats: fs.stats, unmount }
}

/**
 * fuse-native with xattr answers fitted to the caller's buffer. Its own handlers
 * copy a value into any buffer and report the value's full length: with a buffer
 * too small (the kernel probes security.capability with 24 bytes on exec), libfuse
 * would then send bytes past the end of its allocation. Here a size query (empty
 * buffer) gets the exact size, and a small buffer gets ERANGE, as xattr(7) says.
 */
class ImageFuse extends Fuse {
  /** Set when the unmount found the mount already gone: what fusermount said about it. */
  goneBefore: string | undefined
  private readonly imageFs: ImageFs

  constructor (mountpoint: string, fs: ImageFs, options: Fuse.Options) {
    super(mountpoint, fs.operations(), options)
    this.imageFs = fs
  }

  /**
   * fuse-native's dispatchers, with GETATTR (which libfuse2 also sends for LOOKUP),
   * READDIR and READ replaced by lean ones. fuse-native's dispatcher, per request,
   * binds a signal function, copies the arguments twice, starts and clears a timer,
   * converts stat objects into new arrays and defers the answer with
   * process.nextTick; these answer the binding directly, with stat arrays made once
   * per node (ImageFs.getattrArray, readdirArrays), and start a timer only for a read
   * that has to wait (the safety net behind the resolver's own deadline, as
   * fuse-native's was). The handlers look the filesystem up when called: this runs
   * inside fuse-native's constructor, before `imageFs` is set.
   */
  protected override _makeHandlerArray (): unknown[] {
    const handlers = super._makeHandlerArray()
    const b = fuseBinding()
    const timeoutMs = this.timeout
    handlers[b.op_getattr] = (l: Buffer, _op: number, path: string): void => {
      const stat = this.imageFs.getattrArray(path)
      if (typeof stat === 'number') b.fuse_native_signal_getattr(l, stat, NO_STAT)
      else b.fuse_native_signal_getattr(l, 0, stat)
    }
    handlers[b.op_readdir] = (l: Buffer, _op: number, path: string): void => {
      const listing = this.imageFs.readdirArrays(path)
      if (typeof listing === 'number') b.fuse_native_signal_readdir(l, listing, [], [])
      else b.fuse_native_signal_readdir(l, 0, listing.names, listing.stats)
    }
    handlers[b.op_read] = (l: Buffer, _op: number, path: string, _fd: number, buffer: Buffer, length: number, offsetLow: number, offsetHigh: number): void => {
      let answered = false
      let timer: NodeJS.Timeout | undefined
      const reply = (n: number): void => {
        if (answered) return
        answered = true
        if (timer !== undefined) clearTimeout(timer)
        b.fuse_native_signal_read(l, n, 0, buffer.buffer)
      }
      if (!this.imageFs.read(path, buffer, length, offsetLow + offsetHigh * 4294967296, reply) && !answered && timeoutMs > 0) {
        timer = setTimeout(reply, timeoutMs, ETIMEDOUT)
      }
    }
    return handlers
  }

  /**
   * Replaces fuse-native's `_close` (nanoresource's close hook), which runs fusermount
   * through a shell and, when that fails, returns the error without releasing the
   * session's uv_async handle. When someone else unmounted the path first, fusermount
   * always fails ("Invalid argument"), and that ref'd handle kept the agent alive
   * after SIGTERM until kill -9 (issue 15). Here fusermount runs without a shell, and a
   * failure is an error only while the path is still a FUSE mount.
   */
  _close (cb: (err: Error | null) => void): void {
    void (async () => {
      const said = await fusermountUnmount(this.mnt)
      if (said !== undefined) {
        if (await isFuseMount(this.mnt).catch(() => true)) throw new Error(said)
        this.goneBefore = said
      }
      // What fuse-native does after a successful fusermount: unref the session's handle.
      fuseBinding().fuse_native_unmount(this.mnt, (this as unknown as { _thread: Buffer })._thread)
    })().then(() => cb(null), (err: unknown) => cb(err instanceof Error ? err : new Error(String(err))))
  }

  protected override _op_getxattr (reply: (code: number, buffer: ArrayBuffer) => void, path: string, name: string, buffer: Buffer, position: number): void {
    const raw = buffer.buffer as ArrayBuffer
    this.ops.getxattr!(path, name, position, (code, value) => {
      if (code !== 0 || value === undefined) return reply(code !== 0 ? code : Fuse.ENODATA, raw)
      if (buffer.length === 0) return reply(value.length, raw)
      if (value.length > buffer.length) return reply(Fuse.ERANGE, raw)
      value.copy(buffer)
      reply(value.length, raw)
    })
  }

  protected override _op_listxattr (reply: (code: number, buffer: ArrayBuffer) => void, path: string, buffer: Buffer): void {
    const raw = buffer.buffer as ArrayBuffer
    this.ops.listxattr!(path, (code, names) => {
      if (code !== 0 || names === undefined) return reply(code, raw)
      // The list is NUL-terminated names, back to back.
      const list = Buffer.from(names.map(n => `${n}\0`).join(''))
      if (buffer.length === 0) return reply(list.length, raw)
      if (list.length > buffer.length) return reply(Fuse.ERANGE, raw)
      list.copy(buffer)
      reply(list.length, raw)
    })
  }
}

/** Reads the view's catalogs into memory, bottom layer first, while they fit in BUDGET bytes together. */
function preloadCatalogs (view: MergedView, budget: number, log: Logger): void {
  const started = performance.now()
  let bytes = 0
  let layers = 0
  for (const catalog of view.catalogs) {
    const read = catalog.preload(budget - bytes)
    if (read === 0) continue
    bytes += read
    layers++
  }
  log.debug({ layers, bytes, ms: Math.round(performance.now() - started) }, 'catalogs preloaded')
}

/** `fusermount -uz PATH` without a shell; undefined on success, else what it said. */
async function fusermountUnmount (path: string): Promise<string | undefined> {
  return await new Promise(resolve => {
    execFile('fusermount', ['-uz', path], { timeout: UNMOUNT_TIMEOUT_MS }, (err, _stdout, stderr) => {
      if (err === null) resolve(undefined)
      else resolve(stderr.trim() !== '' ? stderr.trim() : err.message)
    })
  })
}

interface FuseBinding {
  fuse_native_unmount: (mnt: string, thread: Buffer) => void
  op_getattr: number
  op_readdir: number
  op_read: number
  fuse_native_signal_getattr: (l: Buffer, code: number, stat: Uint32Array) => void
  fuse_native_signal_readdir: (l: Buffer, code: number, names: string[], stats: Uint32Array[]) => void
  fuse_native_signal_read: (l: Buffer, code: number, unused: number, buffer: ArrayBufferLike) => void
}
/** What fuse-native sends with a failed GETATTR (the binding reads a stat array whatever the code). */
const NO_STAT = new Uint32Array(18)
/** fuse-native's answer to an operation past its timeout (-ETIMEDOUT). */
const ETIMEDOUT = -110
let binding: FuseBinding | undefined
/** fuse-native's native addon (the very module instance fuse-native loaded: require caches it). */
function fuseBinding (): FuseBinding {
  if (binding === undefined) {
    const entry = createRequire(import.meta.url).resolve('fuse-native')
    binding = (createRequire(entry)('node-gyp-build') as (dir: string) => FuseBinding)(dirname(entry))
  }
  return binding
}

/** Runs a node-style callback API, failing after MS or when SIGNAL aborts. */
async function callbackWithDeadline (run: (cb: (err: Error | null) => void) => void, ms: number, signal?: AbortSignal): Promise<void> {
  const deadline = AbortSignal.timeout(ms)
  const stop = signal === undefined ? deadline : AbortSignal.any([deadline, signal])
  stop.throwIfAborted()
  await new Promise<void>((resolve, reject) => {
    const onAbort = (): void => reject(deadline.aborted ? new Error(`no answer within ${ms} ms`) : stop.reason)
    stop.addEventListener('abort', onAbort, { once: true })
    run(err => {
      stop.removeEventListener('abort', onAbort)
      if (err === null) resolve()
      else reject(err)
    })
  })
}
