import Fuse from 'fuse-native'
import { FormatError } from '../errors.ts'
import { FileReader } from '../fetch/file-reader.ts'
import { errorText, type Logger } from '../util/log.ts'
import type { ChunkResolver, ServedHook } from '../fetch/resolver.ts'
import { isDir, isLnk, isReg } from '../format/catalog.ts'
import type { MergedNode, MergedView } from '../image/merged-view.ts'

/**
 * The filesystem operations of a mounted image, over a MergedView (metadata,
 * from the catalogs) and a ChunkResolver (file content). Read-only: the mount is
 * made `ro`, so the kernel refuses every write before it reaches us.
 *
 * Metadata ops are synchronous SQLite probes, answered in microseconds; only
 * `read` waits, for chunks, and never longer than the resolver's timeout. Any
 * failure becomes an errno for the caller (EIO for content that cannot be had),
 * never a thrown exception on the FUSE thread's path.
 */

export interface ImageFsOptions {
  view: MergedView
  resolver: ChunkResolver
  log: Logger
  /** Aborted when the mount goes away: pending reads then fail with EIO. */
  signal: AbortSignal
  /** See FileReader. Default 8. */
  readaheadChunks?: number
  /** Paths whose resolution (or absence) is remembered. Default 20 000. */
  pathCacheSize?: number
  /** Files whose reader (readahead state, extents) is kept. Default 1,024. */
  maxReaders?: number
  /** Directory listings (names and stats, ready for FUSE) kept, counted in entries (about 250 bytes each). Default 50,000. */
  listingEntries?: number
  /** Which source served the chunks this image's reads needed (per-image bytes by source). */
  onServed?: ServedHook
  /** Told of every successful read that reaches FUSE: `shoal trace` records them as the prefetch list. */
  onRead?: (path: string, offset: number, length: number) => void
}

export interface ImageFsStats {
  /** Files whose reading began: a reader was made at the first read (opens themselves never reach the agent). */
  opens: number
  reads: number
  bytesRead: number
  /** Reads answered with EIO (chunk unavailable, or an internal error). */
  readErrors: number
}

export class ImageFs {
  readonly stats: ImageFsStats = { opens: 0, reads: 0, bytesRead: 0, readErrors: 0 }
  private readonly view: MergedView
  private readonly resolver: ChunkResolver
  private readonly log: Logger
  private readonly signal: AbortSignal
  private readonly readaheadChunks: number
  private readonly pathCacheSize: number
  private readonly onRead: ((path: string, offset: number, length: number) => void) | undefined
  private readonly onServed: ServedHook | undefined
  private readonly root: MergedNode
  /**
   * Resolved paths, null for "does not exist" (the image never changes, so
   * negative answers are as good as positive ones). Evicted oldest-first: the
   * kernel caches entries for an hour, so a path is rarely asked twice soon.
   */
  private readonly paths = new Map<string, MergedNode | null>()
  /** Readers of the files being read, by path, least recently used first (see `read`). */
  private readonly readers = new Map<string, FileReader>()
  private readonly maxReaders: number
  /** st_ino = ino × layers + layer: stable, unique per (layer, inode), shared by hard links. */
  private readonly layerCount: number
  /** Each node's attributes as fuse-native's stat array, made once (the image never changes). */
  private readonly statArrays = new WeakMap<MergedNode, Uint32Array>()
  /**
   * Directory listings by path, least recently used first: libfuse2 keeps no readdir
   * cache, so every `ls` or `find` of a directory asks again, and the answer never
   * changes. Bounded by the entries they hold (listingEntries).
   */
  private readonly listings = new Map<string, Listing>()
  private listingEntries = 0
  private readonly maxListingEntries: number

  constructor (options: ImageFsOptions) {
    this.view = options.view
    this.resolver = options.resolver
    this.log = options.log
    this.signal = options.signal
    this.readaheadChunks = options.readaheadChunks ?? 8
    this.pathCacheSize = options.pathCacheSize ?? 20_000
    this.maxReaders = options.maxReaders ?? 1024
    this.maxListingEntries = options.listingEntries ?? 50_000
    this.onRead = options.onRead
    this.onServed = options.onServed
    this.root = this.view.root()
    this.layerCount = this.view.catalogs.length
    // fuse-native passes st_ino as 32 bits; refuse an image whose numbers would wrap
    // (colliding st_ino would make tar and cp merge distinct files as hard links).
    for (const [layer, catalog] of this.view.catalogs.entries()) {
      if (catalog.maxIno() * this.layerCount + layer > 0xffffffff) {
        throw new FormatError(`layer ${layer} has ${catalog.maxIno()} inodes: too many for 32-bit inode numbers across ${this.layerCount} layers`)
      }
    }
  }

  /** The operations table for fuse-native (ImageFuse in mount.ts fits xattr answers to the caller's buffer). */
  operations (): Fuse.Operations {
    return {
      statfs: (_path, cb) => {
        // ST_RDONLY; no free space. namemax matters: some tools size name buffers by it.
        cb(0, { bsize: 4096, frsize: 4096, blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, favail: 0, fsid: 0, flag: 1, namemax: 255 })
      },
      getattr: (path, cb) => {
        const stat = this.getattrArray(path)
        if (typeof stat === 'number') return cb(stat)
        cb(0, statFromArray(stat))
      },
      readdir: (path, cb) => {
        const listing = this.readdirArrays(path)
        if (typeof listing === 'number') return cb(listing)
        cb(0, listing.names, listing.stats.map(statFromArray))
      },
      readlink: (path, cb) => {
        this.guard(cb, 'readlink', path, () => {
          const node = this.node(path)
          if (node === undefined) return cb(Fuse.ENOENT)
          if (!isLnk(node.inode.mode)) return cb(Fuse.EINVAL)
          cb(0, node.inode.target ?? '')
        })
      },
      // No `open` or `release`: libfuse answers them itself (keeping `kernel_cache`), so opening
      // a file costs no trip to this thread; `cat` of a small file that the page cache holds never
      // reaches us at all. Reads find their file's reader by path instead.
      read: (path, _fd, buffer, length, position, cb) => { this.read(path, buffer, length, position, cb) },
      getxattr: (path, name, _position, cb) => {
        this.guard(cb, 'getxattr', path, () => {
          const node = this.node(path)
          if (node === undefined) return cb(Fuse.ENOENT)
          const value = this.view.xattrs(node).get(name)
          if (value === undefined) return cb(Fuse.ENODATA)
          cb(0, value)
        })
      },
      listxattr: (path, cb) => {
        this.guard(cb, 'listxattr', path, () => {
          const node = this.node(path)
          if (node === undefined) return cb(Fuse.ENOENT)
          cb(0, [...this.view.xattrs(node).keys()])
        })
      }
    }
  }

  /**
   * GETATTR (libfuse2's LOOKUP too) as fuse-native's stat array, or a negative errno.
   * Synchronous: ImageFuse answers it without a callback, a timer or a copy.
   */
  getattrArray (path: string): Uint32Array | number {
    try {
      const node = this.node(path)
      if (node === undefined) return Fuse.ENOENT
      return this.statArray(node)
    } catch (err) {
      this.log.error({ op: 'getattr', path, err: errorText(err) }, 'filesystem operation failed: EIO')
      return Fuse.EIO
    }
  }

  /** READDIR: names (with `.` and `..`) and their stat arrays, or a negative errno; kept per directory. */
  readdirArrays (path: string): Listing | number {
    const known = this.listings.get(path)
    if (known !== undefined) {
      this.listings.delete(path)
      this.listings.set(path, known)
      return known
    }
    try {
      const node = this.node(path)
      if (node === undefined) return Fuse.ENOENT
      if (!isDir(node.inode.mode)) return Fuse.ENOTDIR
      const parent = path === '/' ? this.root : this.node(path.slice(0, Math.max(1, path.lastIndexOf('/'))))!
      const names = ['.', '..']
      const stats = [this.statArray(node), this.statArray(parent)]
      const prefix = path === '/' ? '/' : `${path}/`
      for (const { name, node: child } of this.view.readdir(node)) {
        names.push(name)
        stats.push(this.statArray(child))
        // `ls -l` and `find` look each entry up next: have the answer ready.
        this.remember(prefix + name, child)
      }
      const listing = { names, stats }
      this.listings.set(path, listing)
      this.listingEntries += names.length
      for (const [oldest, dropped] of this.listings) {
        if (this.listingEntries <= this.maxListingEntries) break
        this.listings.delete(oldest)
        this.listingEntries -= dropped.names.length
      }
      return listing
    } catch (err) {
      this.log.error({ op: 'readdir', path, err: errorText(err) }, 'filesystem operation failed: EIO')
      return Fuse.EIO
    }
  }

  /**
   * READ: CB gets the byte count or a negative errno, at once when the bytes are at
   * hand (memory, or a synchronous pread), else when the chunks come. Returns whether
   * it answered at once.
   */
  read (path: string, buffer: Buffer, length: number, position: number, cb: (n: number) => void): boolean {
    this.stats.reads++
    let result: number | Promise<number>
    try {
      const reader = this.reader(path)
      if (reader === undefined) {
        cb(Fuse.ENOENT)
        return true
      }
      result = reader.read(buffer, position, length, this.signal)
    } catch (err) {
      this.readFailed(path, position, length, err, cb)
      return true
    }
    // Memory hits and small preads answer at once, without a promise.
    if (typeof result === 'number') {
      this.readDone(path, position, result, cb)
      return true
    }
    result.then(n => this.readDone(path, position, n, cb), (err: unknown) => this.readFailed(path, position, length, err, cb))
    return false
  }

  /** Stops readahead of every open file (the mount is going away). */
  closeAll (): void {
    for (const reader of this.readers.values()) reader.close()
    this.readers.clear()
  }

  private readDone (path: string, position: number, n: number, cb: (n: number) => void): void {
    this.stats.bytesRead += n
    if (n > 0 && this.onRead !== undefined) {
      try { this.onRead(path, position, n) } catch (err) { this.log.error({ path, err: errorText(err) }, 'read hook failed') }
    }
    cb(n)
  }

  private readFailed (path: string, position: number, length: number, err: unknown, cb: (code: number) => void): void {
    this.stats.readErrors++
    this.log.warn({ path, offset: position, length, err: errorText(err) }, 'read failed: EIO')
    cb(Fuse.EIO)
  }

  /** Resolves an absolute path from the kernel, one component at a time through the cache. */
  private node (path: string): MergedNode | undefined {
    if (path === '/') return this.root
    const cached = this.paths.get(path)
    if (cached !== undefined) return cached ?? undefined
    const slash = path.lastIndexOf('/')
    const parent = this.node(slash === 0 ? '/' : path.slice(0, slash))
    const node = parent !== undefined && parent.dirs.length > 0 ? this.view.lookup(parent, path.slice(slash + 1)) : undefined
    this.remember(path, node ?? null)
    return node
  }

  private remember (path: string, node: MergedNode | null): void {
    if (this.paths.size >= this.pathCacheSize) this.paths.delete(this.paths.keys().next().value!)
    this.paths.set(path, node)
  }

  /** NODE's attributes as fuse-native's stat array (see statArrayOf), made once per node. */
  private statArray (node: MergedNode): Uint32Array {
    let array = this.statArrays.get(node)
    if (array === undefined) {
      array = statArrayOf(this.stat(node))
      this.statArrays.set(node, array)
    }
    return array
  }

  private stat (node: MergedNode): Fuse.Stat {
    const i = node.inode
    // A symlink's size is its target's length in bytes, whatever the catalog rounded.
    const size = isLnk(i.mode) ? Buffer.byteLength(i.target ?? '') : i.size
    return {
      mode: i.mode,
      uid: i.uid,
      gid: i.gid,
      size,
      // Directories: the catalog's count, 1 ("unknown", as overlayfs reports merged
      // directories): counting subdirectories across layers would cost a readdir per stat.
      nlink: i.nlink,
      ino: i.ino * this.layerCount + node.layer,
      rdev: i.rdev,
      blksize: 4096,
      blocks: Math.ceil(size / 512),
      // Images keep one time per file; atime and ctime cannot be more truthful than mtime.
      atime: i.mtime,
      mtime: i.mtime,
      ctime: i.mtime
    }
  }

  /**
   * The reader of the regular file at PATH, made on its first read. One per path,
   * so concurrent readers of one file share its readahead state; kept for the
   * `maxReaders` most recently read files (readahead of the one dropped stops).
   */
  private reader (path: string): FileReader | undefined {
    const known = this.readers.get(path)
    if (known !== undefined) {
      this.readers.delete(path)
      this.readers.set(path, known)
      return known
    }
    const node = this.node(path)
    // Devices, fifos and sockets are read by the kernel itself; only files get here.
    if (node === undefined || !isReg(node.inode.mode)) return undefined
    const reader = new FileReader(this.resolver, this.view.extents(node), node.inode.size, {
      readaheadChunks: this.readaheadChunks,
      signal: this.signal,
      ...(this.onServed !== undefined ? { onServed: this.onServed } : {})
    })
    this.readers.set(path, reader)
    this.stats.opens++
    if (this.readers.size > this.maxReaders) {
      const [oldest, dropped] = this.readers.entries().next().value!
      this.readers.delete(oldest)
      dropped.close()
    }
    return reader
  }

  /** Runs a synchronous handler; a throw (e.g. a catalog error) answers EIO instead of escaping. */
  private guard (cb: (code: number) => void, op: string, path: string, handler: () => void): void {
    try {
      handler()
    } catch (err) {
      this.log.error({ op, path, err: errorText(err) }, 'filesystem operation failed: EIO')
      cb(Fuse.EIO)
    }
  }
}

/** A directory's answer to READDIR, as fuse-native's binding takes it. */
export interface Listing { names: string[], stats: Uint32Array[] }

/**
 * STAT as fuse-native packs it for its binding (its `getStatArray`, which it does not
 * export): 18 uint32s, 64-bit values as low and high halves, times in ms.
 */
export function statArrayOf (stat: Fuse.Stat): Uint32Array {
  const a = new Uint32Array(18)
  a[0] = stat.mode
  a[1] = stat.uid
  a[2] = stat.gid
  setDouble(a, 3, stat.size)
  a[5] = 0 // dev
  a[6] = stat.nlink || 1
  a[7] = stat.ino
  a[8] = stat.rdev
  a[9] = stat.blksize
  setDouble(a, 10, stat.blocks)
  setDouble(a, 12, stat.atime)
  setDouble(a, 14, stat.mtime)
  setDouble(a, 16, stat.ctime)
  return a
}

/** The inverse of statArrayOf (fuse-native's own handlers, and tests, take objects). */
function statFromArray (a: Uint32Array): Fuse.Stat {
  const double = (i: number): number => a[i]! + a[i + 1]! * 4294967296
  return { mode: a[0]!, uid: a[1]!, gid: a[2]!, size: double(3), nlink: a[6]!, ino: a[7]!, rdev: a[8]!, blksize: a[9]!, blocks: double(10), atime: double(12), mtime: double(14), ctime: double(16) }
}

function setDouble (a: Uint32Array, i: number, n: number): void {
  a[i] = n % 4294967296
  a[i + 1] = (n - a[i]!) / 4294967296
}
