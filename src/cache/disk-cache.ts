import { randomBytes } from 'node:crypto'
import { close as closeCb, closeSync, fchmodSync, fstat as fstatCb, fstatSync, ftruncateSync, open as openCb, openSync, read as readCb, readFileSync, readSync, write as writeCb } from 'node:fs'
import { chmod, lstat, mkdir, readdir, rm, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { errorText, silentLogger, type Logger } from '../util/log.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { IntegrityError } from '../errors.ts'
import { digestHex, type Digest } from '../oci/digest.ts'
import { Semaphore } from '../util/limit.ts'
import { writeAtomic } from '../util/files.ts'
import { encodeSegmentRecord, parseSegmentIndex, SEGMENT_NAME_RE, SEGMENT_RECORD_BYTES, SEGMENT_TOMBSTONE, segmentFileName } from './segments.ts'

/**
 * The node's content-addressed chunk store: DIR/chunks/<2 hex>/<64 hex> holds the
 * uncompressed bytes of the chunk with that SHA-256. Chunks are shared by every
 * image on the node, so a chunk common to two images is stored (and fetched) once.
 *
 * Crash safety: a chunk is written to DIR/tmp, fsynced, then renamed into place,
 * so after a kill -9 at any moment a file under chunks/ is either absent or
 * complete. Leftover temp files are deleted on open. Only bytes that passed
 * verification are ever written (`put`'s contract; the resolver checks length
 * and SHA-256 of everything from a peer or the origin first).
 *
 * Trust (docs/ARCHITECTURE.md, "Trust boundary"): a chunk this process wrote, or
 * has hashed once since it opened the cache (`markVerified`), is *verified*, and
 * its reads are plain preads of the bytes asked for (`readInto`), not hashed
 * again. A chunk found by the startup scan is not verified until the resolver has
 * read it whole and hashed it, once. What can still go wrong with a verified file
 * is caught without hashing: its length is checked when it is opened (fstat) and
 * on every read (a short read), open files that someone deleted (`shoal cache
 * verify` removes bad chunks) are noticed within `openFileCheckMs`, and a bad file
 * is removed and fetched again.
 *
 * Open files: reads go through a bounded LRU of open descriptors (`openFiles`),
 * so a chunk read many times costs one open(). A descriptor is closed only when no
 * read is using it (a closed fd number could be reused by the next open, and a
 * pread in flight would then read another file).
 *
 * The index (size and recency of every chunk) lives in memory, rebuilt by a scan
 * of the directory on open, rather than in a database: the files are then the
 * only record, so there is nothing to get out of step after a crash, and a miss
 * costs no IO at all. The scan is a readdir per prefix plus a stat per chunk
 * (100 k chunks, i.e. ~100 GiB of 1 MiB chunks, scan in seconds, in parallel with
 * nothing waiting on it but mounts). Recency is kept in memory only; after a
 * restart it starts from the files' mtimes, i.e. when they were written.
 *
 * Size limit: when the chunks exceed `maxBytes` (the high watermark), the least
 * recently used are deleted until they are at `lowWatermark` of it. Deleting a
 * file does not disturb a reader that already opened it (POSIX unlink), and a
 * reader that comes too late sees a miss, which the resolver fills elsewhere.
 *
 * One process owns a cache directory at a time (the agent); the open-time
 * cleanup of DIR/tmp would otherwise delete another process's half-written files.
 * (`shoal cache verify` may run beside the agent: it only reads and deletes chunk
 * files, and the agent takes a deleted file for a miss.)
 *
 * Segments (small chunks): a chunk shorter than `segmentChunkLimit` is not a file
 * of its own but appended to a segment, DIR/segments/NNNNNNNN.data, with a record
 * in NNNNNNNN.idx (its presence map; format in segments.ts), as Nydus's blobcache and
 * stargz's cache keep chunks in a few large files. Reading a small file then costs
 * no open() and no directory or inode lookup in the cache, and small chunks written
 * together (the files of a directory, in pack order) lie together, so the kernel's
 * readahead brings their neighbours in with them. Segments are kept open, take
 * about `segmentBytes` each, and are evicted whole (when the least recently used
 * chunk left is one of theirs). Crash safety differs from chunk files: nothing is
 * fsynced and a record is written after the bytes it names, so after a kill -9 a
 * record names complete bytes, and a torn record is skipped (CRC); after a power
 * loss a record may name bytes that never reached the disk, which the hash on
 * first use after the restart catches (a chunk found bad gets a tombstone record).
 * `shoal cache verify` hashes every live chunk of every segment and deletes a
 * segment holding a bad one; the agent notices as it does for chunk files.
 *
 * Permissions: chunks are pieces of image files, /etc/shadow included, which FUSE
 * shows only to those the image's modes allow. So the cache is its owner's alone:
 * directories 0700, chunk files 0600 (CACHE_MODES), and open tightens what an older
 * version left looser (issue 15: `head -c 60 state/cache/chunks/3f/...` printed an
 * image's /etc/shadow to any local user).
 */

export interface DiskCacheOptions {
  dir: string
  /** High watermark: eviction starts when the chunks take more than this. */
  maxBytes: number
  /** Eviction stops at this fraction of maxBytes. Default DISK_CACHE_DEFAULTS.lowWatermark. */
  lowWatermark?: number
  /** Chunk files kept open for reads. Default DISK_CACHE_DEFAULTS.openFiles. */
  openFiles?: number
  /** How often open files are checked for having been deleted by someone else. Default DISK_CACHE_DEFAULTS.openFileCheckMs. */
  openFileCheckMs?: number
  /** Chunks shorter than this (bytes) go to segments; 0: every chunk is a file. Default DISK_CACHE_DEFAULTS.segmentChunkLimit. */
  segmentChunkLimit?: number
  /** A segment takes new chunks until it holds this many bytes. Default DISK_CACHE_DEFAULTS.segmentBytes. */
  segmentBytes?: number
  /** Bytes read into the page cache around a small read that went to the disk (see `warm`); 0: none. Default DISK_CACHE_DEFAULTS.warmWindowBytes. */
  warmWindowBytes?: number
  log?: Logger
  /** Aborts the startup scan. */
  signal?: AbortSignal
}

export interface DiskCacheStats {
  /** Bytes of chunk content stored (file sizes, not disk blocks). */
  bytes: number
  chunks: number
  writes: number
  /** Writes that failed (disk full, IO error): the chunk is simply not cached. */
  writeErrors: number
  evictions: number
  evictedBytes: number
  /** Files deleted because they failed verification (length or SHA-256). */
  removedBad: number
  /** Chunk files someone else deleted (e.g. `shoal cache verify`) while this process had them open. */
  removedOutside: number
  /** Chunks found on disk at open and hashed on their first use since (see the class comment). */
  verifiedOnFirstUse: number
  /** Chunk files open for reads now. */
  openFiles: number
  /** Temp files of interrupted writes deleted on open. */
  staleTempFiles: number
}

interface IndexEntry {
  size: number
  /** Written or hashed by this process: reads need no hash. */
  verified: boolean
  /** Where the bytes are when not in a chunk file of their own. */
  segment?: Segment
  offset: number
}

/** An open segment: DATA holds small chunks back to back, IDX their records (segments.ts). */
interface Segment {
  id: number
  fd: number
  idxFd: number
  /** Bytes of the data file taken (the next chunk goes here). */
  size: number
  idxSize: number
  /** The chunks of the index that are in this segment. */
  hexes: Set<string>
  /** Reads and writes using its fds now: they are closed only when none is. */
  users: number
  /** Evicted, deleted by someone else, or closed: close the fds when the last user is done. */
  retired: boolean
}

interface OpenChunkFile {
  fd: number
  entry: IndexEntry
  /** Reads using the fd now: it is closed only when none is. */
  users: number
  /** Out of the LRU (evicted, removed, closed): close when the last user is done. */
  retired: boolean
}

/** Who may read the cache: its owner only (see the class comment). */
export const CACHE_MODES = { dir: 0o700, file: 0o600 } as const

export const DISK_CACHE_DEFAULTS = {
  lowWatermark: 0.9,
  /**
   * Chunk files kept open: 1,024 1 MiB chunks cover a 1 GiB working set of random
   * reads at one open() each; beyond it, a read costs an open() more (on the
   * thread pool), not a failure. (Node raises the soft RLIMIT_NOFILE to the hard
   * limit at start, so this fits beside the agent's sockets.)
   */
  openFiles: 1024,
  /** Reads up to this size may be made synchronously (tryReadSync): a 4 KiB page, a few of them. */
  syncReadMaxBytes: 16 * 1024,
  /** ... while they take less than this on average (a disk that answers from its cache or flash). */
  syncReadMaxMs: 0.5,
  /** Over syncReadMaxMs, one read in this many is still synchronous, to measure again. */
  syncReadProbeEvery: 64,
  /** Open files are checked this often for having been deleted by someone else. */
  openFileCheckMs: 10_000,
  /**
   * Chunks shorter than this go to segments instead of files of their own: small
   * files are one chunk each, and for them the open() and the cache's directory
   * and inode lookups cost more than the read.
   */
  segmentChunkLimit: 64 * 1024,
  /** Size of a segment (bytes of chunks it takes before the next one starts): the unit of eviction. */
  segmentBytes: 64 * 1024 * 1024,
  /** A small synchronous read slower than this (ms) went to the disk: warm its window. */
  warmAfterMs: 0.05,
  /** The window read into the page cache around such a read: squashfs's block size. */
  warmWindowBytes: 128 * 1024,
  /** Window reads in flight at most (thread-pool threads they may take). */
  warmConcurrency: 2,
  /** Bound the stat calls of the startup scan (file descriptors, thread pool). */
  scanConcurrency: 32,
  /** Bound the unlinks of an eviction. */
  unlinkConcurrency: 16
} as const

const CHUNK_NAME_RE = /^[0-9a-f]{64}$/
/** Weight of the newest synchronous read time in the moving average (about the last 30 reads count). */
const SYNC_READ_EWMA_WEIGHT = 1 / 32

export class DiskCache {
  readonly name = 'disk'
  readonly dir: string
  readonly maxBytes: number
  readonly lowWatermark: number
  readonly stats: DiskCacheStats = { bytes: 0, chunks: 0, writes: 0, writeErrors: 0, evictions: 0, evictedBytes: 0, removedBad: 0, removedOutside: 0, verifiedOnFirstUse: 0, openFiles: 0, staleTempFiles: 0 }
  private readonly log: Logger
  private readonly maxOpenFiles: number
  /** Every stored chunk by hex digest; Map order is recency order, least recent first. */
  private readonly index = new Map<string, IndexEntry>()
  /** Writes in progress, with their bytes: a chunk being written is already a hit. */
  private readonly writing = new Map<string, { data: Uint8Array, done: Promise<void> }>()
  /** Open chunk files by hex digest, least recently used first. */
  private readonly files = new Map<string, OpenChunkFile>()
  /** Opens in progress (one per chunk, shared by concurrent readers). */
  private readonly opening = new Map<string, Promise<OpenChunkFile | undefined>>()
  private readonly checkTimer: NodeJS.Timeout
  private evicting: Promise<void> | undefined
  private closed = false
  /** Moving average of synchronous read times (ms), and reads sent to the thread pool since the last probe. */
  private syncReadMs = 0
  private syncReadSkips = 0
  private checking = false
  private readonly segmentChunkLimit: number
  private readonly warmWindowBytes: number
  private warming = 0
  private readonly warmBuffers: Buffer[] = []
  private readonly segmentBytes: number
  /** Every segment by id; `appending` takes new chunks. */
  private readonly segments = new Map<number, Segment>()
  private appending: Segment | undefined
  private nextSegmentId = 1

  private constructor (options: DiskCacheOptions) {
    if (!Number.isSafeInteger(options.maxBytes) || options.maxBytes <= 0) throw new RangeError(`disk cache size must be a positive integer, got ${options.maxBytes}`)
    const low = options.lowWatermark ?? DISK_CACHE_DEFAULTS.lowWatermark
    if (!(low > 0 && low <= 1)) throw new RangeError(`disk cache low watermark must be in (0, 1], got ${low}`)
    const openFiles = options.openFiles ?? DISK_CACHE_DEFAULTS.openFiles
    if (!Number.isSafeInteger(openFiles) || openFiles < 1) throw new RangeError(`disk cache open files must be a positive integer, got ${openFiles}`)
    this.dir = options.dir
    this.maxBytes = options.maxBytes
    this.lowWatermark = low
    this.maxOpenFiles = openFiles
    this.log = options.log ?? silentLogger
    this.segmentChunkLimit = options.segmentChunkLimit ?? DISK_CACHE_DEFAULTS.segmentChunkLimit
    this.warmWindowBytes = options.warmWindowBytes ?? DISK_CACHE_DEFAULTS.warmWindowBytes
    // A segment is evicted whole: keep it a small part of the cache (at most 1/16), or a small cache would lose everything at once.
    this.segmentBytes = Math.max(this.segmentChunkLimit, Math.min(options.segmentBytes ?? DISK_CACHE_DEFAULTS.segmentBytes, Math.floor(options.maxBytes / 16)))
    this.checkTimer = setInterval(() => { void this.checkOpenFiles() }, options.openFileCheckMs ?? DISK_CACHE_DEFAULTS.openFileCheckMs).unref()
  }

  /** Opens (creating if needed) the cache in DIR: removes stale temp files and indexes the chunks. */
  static async open (options: DiskCacheOptions): Promise<DiskCache> {
    const cache = new DiskCache(options)
    try {
      await cache.scan(options.signal)
    } catch (err) {
      clearInterval(cache.checkTimer)
      throw err
    }
    return cache
  }

  has (digest: Digest): boolean {
    const hex = digestHex(digest)
    return this.index.has(hex) || this.writing.has(hex)
  }

  /** Whether DIGEST is stored and its bytes were verified by this process: reads of it need no hash. */
  isVerified (digest: Digest): boolean {
    const hex = digestHex(digest)
    return this.index.get(hex)?.verified === true || this.writing.has(hex)
  }

  /** Records that the resolver hashed the stored bytes of DIGEST and they were right. */
  markVerified (digest: Digest): void {
    const entry = this.index.get(digestHex(digest))
    if (entry === undefined || entry.verified) return
    entry.verified = true
    this.stats.verifiedOnFirstUse++
  }

  /**
   * The stored bytes (the whole chunk), unverified; undefined if absent (or
   * evicted while we looked). Rejects with IntegrityError when the file's length
   * is not the chunk's (the caller removes it).
   */
  async get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined> {
    options.signal.throwIfAborted()
    const pending = this.writing.get(digestHex(chunk.digest))
    if (pending !== undefined) return pending.data
    const data = Buffer.allocUnsafe(chunk.length)
    return await this.readInto(chunk, data, 0, 0, chunk.length) ? data : undefined
  }

  /**
   * Reads LENGTH bytes of CHUNK from CHUNK_OFFSET into TARGET at TARGET_OFFSET
   * (one pread, no copy of the whole chunk). Resolves to false when the chunk is
   * absent (or was evicted meanwhile); rejects with IntegrityError when its file
   * is shorter or longer than the chunk (the caller removes it). The bytes are as
   * stored: only `isVerified` chunks may be served without a hash.
   */
  async readInto (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number): Promise<boolean> {
    const hex = digestHex(chunk.digest)
    const entry = this.index.get(hex)
    if (entry === undefined) {
      const pending = this.writing.get(hex)
      if (pending === undefined) return false
      target.set(pending.data.subarray(chunkOffset, chunkOffset + length), targetOffset)
      return true
    }
    if (entry.size !== chunk.length) throw this.badLength(hex, entry.size, chunk.length)
    this.index.delete(hex)
    this.index.set(hex, entry)
    const segment = entry.segment
    if (segment !== undefined) {
      if (segment.retired) return false
      segment.users++
      let n: number
      try {
        n = await pread(segment.fd, target, targetOffset, length, entry.offset + chunkOffset)
      } finally {
        this.releaseSegment(segment)
      }
      if (n !== length) throw this.shortRead(hex, chunkOffset, n, chunk.length)
      return true
    }
    const file = this.files.get(hex) ?? await this.openFile(hex, entry)
    if (file === undefined) return false
    file.users++
    let n: number
    try {
      n = await pread(file.fd, target, targetOffset, length, chunkOffset)
    } finally {
      this.release(file)
    }
    if (n !== length) throw this.shortRead(hex, chunkOffset, n, chunk.length)
    return true
  }

  /**
   * `readInto` without leaving the event loop, when that is cheap: a small read
   * (syncReadMaxBytes), while synchronous reads (with the open, when the file is
   * not open yet) keep taking less than syncReadMaxMs on average. Returns false when it
   * did not read (the caller then uses `readInto`); throws IntegrityError as
   * `readInto` does.
   *
   * Why: a 4 KiB random read through the thread pool crosses threads twice more
   * than the FUSE hand-off already does; measured on this VM with the page cache
   * dropped, a synchronous pread served 2-3x the IOPS of one job (and as many with
   * four), while 128 KiB sequential reads were faster through the thread pool,
   * which overlaps them. On a slow disk (reads above syncReadMaxMs) reads go to the
   * thread pool, so that the event loop is not held by the disk; one read in
   * syncReadProbeEvery is still made synchronously, to notice when it is fast again.
   */
  tryReadSync (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number): boolean {
    if (length > DISK_CACHE_DEFAULTS.syncReadMaxBytes) return false
    if (this.syncReadMs > DISK_CACHE_DEFAULTS.syncReadMaxMs && ++this.syncReadSkips % DISK_CACHE_DEFAULTS.syncReadProbeEvery !== 0) return false
    const hex = digestHex(chunk.digest)
    const entry = this.index.get(hex)
    if (entry === undefined || this.opening.has(hex)) return false
    if (entry.size !== chunk.length) throw this.badLength(hex, entry.size, chunk.length)
    const started = performance.now()
    const segment = entry.segment
    if (segment !== undefined) {
      if (segment.retired) return false
      this.index.delete(hex)
      this.index.set(hex, entry)
      const n = readSync(segment.fd, target, targetOffset, length, entry.offset + chunkOffset)
      this.syncReadMs += (performance.now() - started - this.syncReadMs) * SYNC_READ_EWMA_WEIGHT
      if (n !== length) throw this.shortRead(hex, chunkOffset, n, chunk.length)
      return true
    }
    let file = this.files.get(hex)
    if (file === undefined) {
      // Opened here too: for a small file read once (`cat` of many small files) the
      // open is most of the work, and two more trips through the thread pool.
      let fd: number
      try {
        fd = openSync(this.chunkPath(hex), 'r')
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
        this.forget(hex, entry) // evicted meanwhile, or deleted by someone else: a miss
        return false
      }
      const size = fstatSync(fd).size
      if (size !== entry.size) {
        closeSync(fd)
        throw this.badLength(hex, size, entry.size)
      }
      file = this.keepOpen(hex, fd, entry)
    }
    this.index.delete(hex)
    this.index.set(hex, entry)
    const n = readSync(file.fd, target, targetOffset, length, chunkOffset)
    const took = performance.now() - started
    this.syncReadMs += (took - this.syncReadMs) * SYNC_READ_EWMA_WEIGHT
    if (n !== length) throw this.shortRead(hex, chunkOffset, n, chunk.length)
    if (took > DISK_CACHE_DEFAULTS.warmAfterMs) this.warm(file, chunkOffset, entry.size)
    return true
  }

  /**
   * After a small read that went to the disk (it took more than warmAfterMs): reads the
   * aligned `warmWindowBytes` around it on the thread pool, into a scratch buffer whose
   * bytes are never used, so that the page cache holds the window and the next small
   * reads in it are answered from memory. squashfuse gets this from its 128 KiB blocks;
   * a 4 KiB pread alone leaves the kernel nothing to read ahead on random access. At
   * most warmConcurrency such reads at once; when they are all busy, none is started.
   */
  private warm (file: OpenChunkFile, offset: number, size: number): void {
    const window = this.warmWindowBytes
    if (window === 0 || this.warming >= DISK_CACHE_DEFAULTS.warmConcurrency) return
    const from = offset - offset % window
    const length = Math.min(window, size - from)
    const buffer = this.warmBuffers.pop() ?? Buffer.allocUnsafe(window)
    this.warming++
    file.users++
    readCb(file.fd, buffer, 0, length, from, () => {
      this.warming--
      this.warmBuffers.push(buffer)
      this.release(file)
    })
  }

  /**
   * Stores verified bytes. Never rejects: a cache that cannot write (disk full)
   * must not fail the read that produced the chunk; failures are counted and logged.
   */
  put (digest: Digest, data: Uint8Array): Promise<void> {
    const hex = digestHex(digest)
    if (this.closed || data.length > this.maxBytes || this.index.has(hex)) return Promise.resolve()
    let pending = this.writing.get(hex)
    if (pending === undefined) {
      const write = data.length < this.segmentChunkLimit ? this.writeToSegment(hex, data) : this.write(hex, data)
      pending = { data, done: write.finally(() => this.writing.delete(hex)) }
      this.writing.set(hex, pending)
    }
    return pending.done
  }

  /** Deletes a stored chunk that failed verification. Never rejects: the chunk is out of the index either way. */
  async remove (digest: Digest): Promise<void> {
    const hex = digestHex(digest)
    const entry = this.index.get(hex)
    if (entry === undefined) return
    this.forget(hex, entry)
    this.stats.removedBad++
    if (entry.segment !== undefined) await this.tombstone(hex, entry.segment, entry.offset)
    else await this.unlinkChunk(hex)
  }

  /** Waits for writes and eviction in progress (a finishing write may start an eviction); later puts are ignored. Closes the open files. */
  async close (): Promise<void> {
    this.closed = true
    clearInterval(this.checkTimer)
    while (this.writing.size > 0 || this.evicting !== undefined) {
      await Promise.all([...[...this.writing.values()].map(w => w.done), this.evicting])
    }
    await Promise.allSettled([...this.opening.values()])
    for (const hex of [...this.files.keys()]) this.closeFile(hex)
    for (const segment of [...this.segments.values()]) this.retireSegment(segment)
  }

  /** Where the bytes of chunk HEX are: a chunk file (offset 0) or a segment (`shoal cache verify` and tests). */
  chunkLocation (hex: string): { path: string, offset: number } | undefined {
    const entry = this.index.get(hex)
    if (entry === undefined) return undefined
    if (entry.segment === undefined) return { path: this.chunkPath(hex), offset: 0 }
    return { path: join(this.dir, 'segments', segmentFileName(entry.segment.id, 'data')), offset: entry.offset }
  }

  /** The path of the chunk file with hex digest HEX (`shoal cache verify` and tests). */
  chunkPath (hex: string): string {
    return join(this.dir, 'chunks', hex.slice(0, 2), hex)
  }

  /** Truncated after it was opened: as bad as a wrong length at open. */
  private shortRead (hex: string, chunkOffset: number, n: number, length: number): IntegrityError {
    return new IntegrityError(`chunk sha256:${hex} in the disk cache`, `the file ended after ${chunkOffset + n} of ${length} bytes`)
  }

  private badLength (hex: string, size: number, length: number): IntegrityError {
    return new IntegrityError(`chunk sha256:${hex} in the disk cache`, `the file holds ${size} bytes instead of ${length}`)
  }

  /** Opens the file of ENTRY (one open per chunk at a time); undefined if it is gone or ENTRY was replaced meanwhile. */
  private async openFile (hex: string, entry: IndexEntry): Promise<OpenChunkFile | undefined> {
    let opening = this.opening.get(hex)
    if (opening === undefined) {
      opening = this.doOpen(hex, entry).finally(() => this.opening.delete(hex))
      this.opening.set(hex, opening)
    }
    const file = await opening
    // A reader that joined an open of an older entry (removed and written again) misses: its caller re-resolves.
    return file?.entry === entry ? file : undefined
  }

  private async doOpen (hex: string, entry: IndexEntry): Promise<OpenChunkFile | undefined> {
    let fd: number
    try {
      fd = await new Promise<number>((resolve, reject) => openCb(this.chunkPath(hex), 'r', (err, fd) => err === null ? resolve(fd) : reject(err)))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
      // Evicted between the index lookup and the open (or deleted by someone else): a plain miss.
      this.forget(hex, entry)
      return undefined
    }
    let size: number
    try {
      size = await new Promise<number>((resolve, reject) => fstatCb(fd, (err, st) => err === null ? resolve(st.size) : reject(err)))
    } catch (err) {
      closeCb(fd, ignore)
      throw err
    }
    // The entry may have been evicted or removed while we opened: do not keep a file nobody indexes.
    if (size !== entry.size || this.closed || this.index.get(hex) !== entry) {
      closeCb(fd, ignore)
      if (size !== entry.size && this.index.get(hex) === entry) throw this.badLength(hex, size, entry.size)
      return undefined
    }
    return this.keepOpen(hex, fd, entry)
  }

  /** Adds FD, the open file of ENTRY, to the LRU of open files, closing the least recently used beyond the bound. */
  private keepOpen (hex: string, fd: number, entry: IndexEntry): OpenChunkFile {
    const file: OpenChunkFile = { fd, entry, users: 0, retired: false }
    this.files.set(hex, file)
    this.stats.openFiles++
    for (const victim of this.files.keys()) {
      if (this.files.size <= this.maxOpenFiles) break
      this.closeFile(victim)
    }
    return file
  }

  private release (file: OpenChunkFile): void {
    if (--file.users === 0 && file.retired) closeCb(file.fd, ignore)
  }

  /** Takes HEX's file out of the LRU; its fd is closed now, or when the last read using it ends. */
  private closeFile (hex: string): void {
    const file = this.files.get(hex)
    if (file === undefined) return
    this.files.delete(hex)
    this.stats.openFiles--
    file.retired = true
    if (file.users === 0) closeCb(file.fd, ignore)
  }

  /**
   * Open files whose name someone else deleted (nlink 0: `shoal cache verify`
   * removing a bad chunk, or an admin) are forgotten: their next read misses and
   * is fetched again, instead of being served from the deleted file forever.
   */
  private async checkOpenFiles (): Promise<void> {
    if (this.checking) return // the last pass is still running (a slow disk)
    this.checking = true
    try {
      await this.checkOpenFilesOnce()
    } finally {
      this.checking = false
    }
  }

  private async checkOpenFilesOnce (): Promise<void> {
    for (const segment of [...this.segments.values()]) {
      if (segment.retired) continue
      segment.users++
      let links: number
      try {
        links = await new Promise<number>((resolve, reject) => fstatCb(segment.fd, (err, st) => err === null ? resolve(st.nlink) : reject(err)))
      } catch {
        continue
      } finally {
        this.releaseSegment(segment)
      }
      if (links === 0 && !segment.retired) {
        this.log.warn({ segment: segment.id, chunks: segment.hexes.size }, 'a cache segment was deleted by someone else: its chunks will be fetched again')
        this.stats.removedOutside += segment.hexes.size
        this.dropSegment(segment)
      }
    }
    for (const [hex, file] of [...this.files]) {
      if (file.retired) continue
      file.users++
      let links: number
      try {
        links = await new Promise<number>((resolve, reject) => fstatCb(file.fd, (err, st) => err === null ? resolve(st.nlink) : reject(err)))
      } catch {
        continue
      } finally {
        this.release(file)
      }
      if (links === 0 && this.index.get(hex) === file.entry) {
        this.log.warn({ chunk: hex }, 'a chunk file was deleted by someone else: it will be fetched again')
        this.stats.removedOutside++
        this.forget(hex, file.entry)
      }
    }
  }

  private async write (hex: string, data: Uint8Array): Promise<void> {
    try {
      await writeAtomic(this.chunkPath(hex), data, { tmp: join(this.dir, 'tmp', `${hex}.${randomBytes(6).toString('hex')}`), mode: CACHE_MODES.file })
    } catch (err) {
      this.stats.writeErrors++
      this.log.warn({ chunk: hex, err: errorText(err) }, 'cannot write chunk to the disk cache')
      return
    }
    this.stats.writes++
    // put() takes verified bytes only, and we wrote them ourselves.
    this.add(hex, data.length, true)
    this.maybeEvict()
  }

  private add (hex: string, size: number, verified: boolean, segment?: Segment, offset = 0): void {
    this.index.set(hex, segment === undefined ? { size, verified, offset } : { size, verified, segment, offset })
    segment?.hexes.add(hex)
    this.stats.bytes += size
    this.stats.chunks++
  }

  private forget (hex: string, entry: IndexEntry): void {
    if (this.index.get(hex) !== entry) return
    this.index.delete(hex)
    this.stats.bytes -= entry.size
    this.stats.chunks--
    if (entry.segment !== undefined) entry.segment.hexes.delete(hex)
    else if (this.files.get(hex)?.entry === entry) this.closeFile(hex)
  }

  private maybeEvict (): void {
    if (this.stats.bytes <= this.maxBytes || this.evicting !== undefined) return
    this.evicting = this.evict().finally(() => {
      this.evicting = undefined
      this.maybeEvict() // writes that landed meanwhile may have crossed the watermark again
    })
  }

  private async evict (): Promise<void> {
    // Out of the index first, all at once: from here on readers miss instead of
    // opening these files, and the accounting is right before the unlinks finish.
    const target = Math.floor(this.maxBytes * this.lowWatermark)
    const victims: string[] = []
    const segments: Segment[] = []
    for (const [hex, entry] of this.index) {
      if (this.stats.bytes <= target) break
      if (entry.segment !== undefined) {
        // A segment goes whole, when its least recently used chunk comes up.
        const segment = entry.segment
        for (const h of [...segment.hexes]) {
          const e = this.index.get(h)!
          this.stats.evictions++
          this.stats.evictedBytes += e.size
        }
        this.dropSegment(segment)
        segments.push(segment)
        continue
      }
      this.forget(hex, entry)
      this.stats.evictions++
      this.stats.evictedBytes += entry.size
      victims.push(hex)
    }
    const limit = new Semaphore(DISK_CACHE_DEFAULTS.unlinkConcurrency)
    await Promise.all([...victims.map(hex => limit.run(() => this.unlinkChunk(hex))), ...segments.map(s => this.unlinkSegment(s.id))])
  }

  /**
   * Appends a small chunk to the segment taking chunks: its bytes, then its record
   * (segments.ts). Places are reserved synchronously, so concurrent writes do not
   * overlap; nothing is fsynced (see the class comment). Never rejects.
   */
  private async writeToSegment (hex: string, data: Uint8Array): Promise<void> {
    let segment: Segment
    try {
      segment = this.segmentFor(data.length)
    } catch (err) {
      this.stats.writeErrors++
      this.log.warn({ chunk: hex, err: errorText(err) }, 'cannot open a cache segment')
      return
    }
    const offset = segment.size
    segment.size += data.length
    const at = segment.idxSize
    segment.idxSize += SEGMENT_RECORD_BYTES
    segment.users++
    try {
      await pwrite(segment.fd, data, offset)
      await pwrite(segment.idxFd, encodeSegmentRecord(hex, offset, data.length), at)
    } catch (err) {
      this.stats.writeErrors++
      this.log.warn({ chunk: hex, err: errorText(err) }, 'cannot write chunk to a cache segment')
      return
    } finally {
      this.releaseSegment(segment)
    }
    if (segment.retired || this.index.has(hex)) return // evicted or deleted meanwhile; or stored since
    this.stats.writes++
    this.add(hex, data.length, true, segment, offset)
    this.maybeEvict()
  }

  /** The segment that takes the next LENGTH bytes: the current one, or a new one when it is full. */
  private segmentFor (length: number): Segment {
    const current = this.appending
    if (current !== undefined && !current.retired && (current.size === 0 || current.size + length <= this.segmentBytes)) return current
    const id = this.nextSegmentId++
    const dir = join(this.dir, 'segments')
    const fd = openSync(join(dir, segmentFileName(id, 'data')), 'wx+', CACHE_MODES.file)
    let idxFd: number
    try {
      idxFd = openSync(join(dir, segmentFileName(id, 'idx')), 'wx+', CACHE_MODES.file)
    } catch (err) {
      closeSync(fd)
      throw err
    }
    const segment: Segment = { id, fd, idxFd, size: 0, idxSize: 0, hexes: new Set(), users: 0, retired: false }
    this.segments.set(id, segment)
    this.appending = segment
    return segment
  }

  /** Records that the chunk HEX at OFFSET of SEGMENT is bad, so that a restart does not find it again. */
  private async tombstone (hex: string, segment: Segment, offset: number): Promise<void> {
    if (segment.retired) return
    const at = segment.idxSize
    segment.idxSize += SEGMENT_RECORD_BYTES
    segment.users++
    try {
      await pwrite(segment.idxFd, encodeSegmentRecord(hex, offset, 0, SEGMENT_TOMBSTONE), at)
    } catch (err) {
      this.log.warn({ chunk: hex, segment: segment.id, err: errorText(err) }, 'cannot mark a bad chunk in its segment (it is hashed again after a restart)')
    } finally {
      this.releaseSegment(segment)
    }
  }

  /** Forgets every chunk of SEGMENT and retires it (its files are left to the caller). */
  private dropSegment (segment: Segment): void {
    for (const hex of [...segment.hexes]) {
      const entry = this.index.get(hex)
      if (entry !== undefined) this.forget(hex, entry)
    }
    this.retireSegment(segment)
  }

  private retireSegment (segment: Segment): void {
    if (segment.retired) return
    segment.retired = true
    this.segments.delete(segment.id)
    if (this.appending === segment) this.appending = undefined
    if (segment.users === 0) this.closeSegmentFds(segment)
  }

  private releaseSegment (segment: Segment): void {
    if (--segment.users === 0 && segment.retired) this.closeSegmentFds(segment)
  }

  private closeSegmentFds (segment: Segment): void {
    closeCb(segment.fd, ignore)
    closeCb(segment.idxFd, ignore)
  }

  private async unlinkSegment (id: number): Promise<void> {
    for (const kind of ['data', 'idx'] as const) {
      try {
        await unlink(join(this.dir, 'segments', segmentFileName(id, kind)))
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.warn({ segment: id, err: errorText(err) }, 'cannot delete cache segment')
      }
    }
  }

  /**
   * Opens the segments in DIR/segments and lists their live chunks (unverified: they
   * are hashed on first use). A file without its pair, a segment with no live chunk
   * and what is not a segment are deleted; a torn last record is cut off.
   */
  private async scanSegments (found: Array<{ hex: string, size: number, mtimeMs: number, segment?: Segment, offset?: number }>): Promise<void> {
    const dir = join(this.dir, 'segments')
    await ownerOnlyDir(dir)
    const ids = new Map<number, Set<string>>()
    for (const name of await readdir(dir)) {
      const m = SEGMENT_NAME_RE.exec(name)
      if (m === null) {
        this.log.warn({ path: join(dir, name) }, 'deleting what is not a segment from the disk cache')
        await rm(join(dir, name), { recursive: true, force: true })
        continue
      }
      const kinds = ids.get(Number(m[1])) ?? new Set()
      kinds.add(m[2]!)
      ids.set(Number(m[1]), kinds)
    }
    for (const [id, kinds] of [...ids].sort((a, b) => a[0] - b[0])) {
      this.nextSegmentId = Math.max(this.nextSegmentId, id + 1)
      if (kinds.size !== 2) {
        await this.unlinkSegment(id)
        continue
      }
      const fd = openSync(join(dir, segmentFileName(id, 'data')), 'r+')
      const idxFd = openSync(join(dir, segmentFileName(id, 'idx')), 'r+')
      const st = fstatSync(fd)
      // Owner-only, as chunk files (CACHE_MODES): tightened if someone loosened them.
      for (const f of [fd, idxFd]) if ((fstatSync(f).mode & 0o077) !== 0) fchmodSync(f, CACHE_MODES.file)
      const { live, wholeBytes } = parseSegmentIndex(readFileSync(idxFd), st.size)
      if (live.size === 0) {
        closeSync(fd)
        closeSync(idxFd)
        await this.unlinkSegment(id)
        continue
      }
      if (fstatSync(idxFd).size !== wholeBytes) ftruncateSync(idxFd, wholeBytes)
      const segment: Segment = { id, fd, idxFd, size: st.size, idxSize: wholeBytes, hexes: new Set(), users: 0, retired: false }
      this.segments.set(id, segment)
      for (const r of live.values()) found.push({ hex: r.hex, size: r.length, mtimeMs: st.mtimeMs, segment, offset: r.offset })
    }
  }

  /** A file left behind after a failed unlink is harmless: it is out of the index, and it is hashed before first use after a restart. */
  private async unlinkChunk (hex: string): Promise<void> {
    try {
      await unlink(this.chunkPath(hex))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.warn({ chunk: hex, err: errorText(err) }, 'cannot delete chunk file')
    }
  }

  private async scan (signal: AbortSignal | undefined): Promise<void> {
    const tmpDir = join(this.dir, 'tmp')
    const chunksDir = join(this.dir, 'chunks')
    const prefixes = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))
    // Created 0700, and tightened if an older version made them 0755 (mkdir leaves an existing dir's mode).
    for (const d of [this.dir, tmpDir, chunksDir]) await ownerOnlyDir(d)
    await Promise.all(prefixes.map(p => ownerOnlyDir(join(chunksDir, p))))
    const stale = await readdir(tmpDir)
    await Promise.all(stale.map(name => rm(join(tmpDir, name), { recursive: true, force: true })))
    this.stats.staleTempFiles = stale.length

    const found: Array<{ hex: string, size: number, mtimeMs: number, segment?: Segment, offset?: number }> = []
    const limit = new Semaphore(DISK_CACHE_DEFAULTS.scanConcurrency)
    await Promise.all(prefixes.map(prefix => limit.run(async () => {
      for (const name of await readdir(join(chunksDir, prefix))) {
        signal?.throwIfAborted()
        const path = join(chunksDir, prefix, name)
        const st = await lstat(path)
        if (!CHUNK_NAME_RE.test(name) || !name.startsWith(prefix) || !st.isFile()) {
          this.log.warn({ path }, 'deleting what is not a chunk from the disk cache')
          await rm(path, { recursive: true, force: true })
          continue
        }
        // Chunks an older version wrote 0644; only those cost a chmod, once.
        if ((st.mode & 0o077) !== 0) await chmod(path, CACHE_MODES.file)
        found.push({ hex: name, size: st.size, mtimeMs: st.mtimeMs })
      }
    }, signal)))
    await this.scanSegments(found)
    found.sort((a, b) => a.mtimeMs - b.mtimeMs)
    // Not verified: written by an earlier process, or by anyone with root since. Hashed on first use.
    // A chunk both in a file and in a segment (or in two segments) counts once.
    for (const f of found) if (!this.index.has(f.hex)) this.add(f.hex, f.size, false, f.segment, f.offset)
    // Segments whose chunks all had another copy hold nothing: they go now.
    for (const segment of [...this.segments.values()]) {
      if (segment.hexes.size > 0) continue
      this.retireSegment(segment)
      await this.unlinkSegment(segment.id)
    }
    // New chunks go on filling the newest segment, if it has room.
    const newest = [...this.segments.values()].at(-1)
    if (newest !== undefined && newest.size < this.segmentBytes) this.appending = newest
    this.maybeEvict()
  }
}

/** Makes directory PATH (and its parents) if needed, and leaves it readable by its owner only. */
export async function ownerOnlyDir (path: string): Promise<void> {
  await mkdir(path, { recursive: true, mode: CACHE_MODES.dir })
  await chmod(path, CACHE_MODES.dir)
}

const ignore = (): void => {}

/** pwrite(2) of all of DATA at POSITION, through libuv's thread pool. */
async function pwrite (fd: number, data: Uint8Array, position: number): Promise<void> {
  let done = 0
  while (done < data.length) {
    done += await new Promise<number>((resolve, reject) => writeCb(fd, data, done, data.length - done, position + done, (err, n) => err === null ? resolve(n) : reject(err)))
  }
}

/** pread(2) through libuv's thread pool: the callback API, without a FileHandle's promise machinery per read. */
function pread (fd: number, target: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => readCb(fd, target, offset, length, position, (err, n) => err === null ? resolve(n) : reject(err)))
}
