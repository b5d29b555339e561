import { randomBytes } from 'node:crypto'
import { chmod, lstat, mkdir, open, readdir, readFile, rename, rm, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import type { ChunkSource } from '../fetch/chunk-source.ts'
import { errorText, silentLogger, type Logger } from '../fetch/log.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { digestHex, type Digest } from '../format/digest.ts'
import { Semaphore } from '../origin/limit.ts'

/**
 * The node's content-addressed chunk store: DIR/chunks/<2 hex>/<64 hex> holds the
 * uncompressed bytes of the chunk with that SHA-256. Chunks are shared by every
 * image on the node, so a chunk common to two images is stored (and fetched) once.
 *
 * Crash safety: a chunk is written to DIR/tmp, fsynced, then renamed into place,
 * so after a kill -9 at any moment a file under chunks/ is either absent or
 * complete. Leftover temp files are deleted on open. Files are still not trusted:
 * the resolver verifies every chunk read from here and calls `remove` on a bad one.
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
  /** Eviction stops at this fraction of maxBytes. Default 0.9. */
  lowWatermark?: number
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
  /** Files deleted because they failed verification. */
  removedBad: number
  /** Temp files of interrupted writes deleted on open. */
  staleTempFiles: number
}

interface IndexEntry { size: number }

/** Who may read the cache: its owner only (see the class comment). */
export const CACHE_MODES = { dir: 0o700, file: 0o600 } as const

const CHUNK_NAME_RE = /^[0-9a-f]{64}$/
/** Bound the stat calls of the startup scan and the unlinks of an eviction (file descriptors, thread pool). */
const SCAN_CONCURRENCY = 32
const UNLINK_CONCURRENCY = 16

export class DiskCache implements ChunkSource {
  readonly name = 'disk'
  readonly dir: string
  readonly maxBytes: number
  readonly lowWatermark: number
  readonly stats: DiskCacheStats = { bytes: 0, chunks: 0, writes: 0, writeErrors: 0, evictions: 0, evictedBytes: 0, removedBad: 0, staleTempFiles: 0 }
  private readonly log: Logger
  /** Every stored chunk by hex digest; Map order is recency order, least recent first. */
  private readonly index = new Map<string, IndexEntry>()
  /** Writes in progress, with their bytes: a chunk being written is already a hit. */
  private readonly writing = new Map<string, { data: Uint8Array, done: Promise<void> }>()
  private evicting: Promise<void> | undefined
  private closed = false

  private constructor (options: DiskCacheOptions) {
    if (!Number.isSafeInteger(options.maxBytes) || options.maxBytes <= 0) throw new RangeError(`disk cache size must be a positive integer, got ${options.maxBytes}`)
    const low = options.lowWatermark ?? 0.9
    if (!(low > 0 && low <= 1)) throw new RangeError(`disk cache low watermark must be in (0, 1], got ${low}`)
    this.dir = options.dir
    this.maxBytes = options.maxBytes
    this.lowWatermark = low
    this.log = options.log ?? silentLogger
  }

  /** Opens (creating if needed) the cache in DIR: removes stale temp files and indexes the chunks. */
  static async open (options: DiskCacheOptions): Promise<DiskCache> {
    const cache = new DiskCache(options)
    await cache.scan(options.signal)
    return cache
  }

  has (digest: Digest): boolean {
    const hex = digestHex(digest)
    return this.index.has(hex) || this.writing.has(hex)
  }

  /** The stored bytes, unverified; undefined if absent (or evicted while we looked). */
  async get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined> {
    const hex = digestHex(chunk.digest)
    const entry = this.index.get(hex)
    if (entry === undefined) return this.writing.get(hex)?.data
    this.index.delete(hex)
    this.index.set(hex, entry)
    try {
      return await readFile(this.chunkPath(hex), { signal: options.signal })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
      // Evicted between the index lookup and the read: a plain miss.
      this.forget(hex, entry)
      return undefined
    }
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
      pending = { data, done: this.write(hex, data).finally(() => this.writing.delete(hex)) }
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
    await this.unlinkChunk(hex)
  }

  /** Waits for writes and eviction in progress (a finishing write may start an eviction); later puts are ignored. */
  async close (): Promise<void> {
    this.closed = true
    while (this.writing.size > 0 || this.evicting !== undefined) {
      await Promise.all([...[...this.writing.values()].map(w => w.done), this.evicting])
    }
  }

  private chunkPath (hex: string): string {
    return join(this.dir, 'chunks', hex.slice(0, 2), hex)
  }

  private async write (hex: string, data: Uint8Array): Promise<void> {
    const tmp = join(this.dir, 'tmp', `${hex}.${randomBytes(6).toString('hex')}`)
    try {
      const handle = await open(tmp, 'wx', CACHE_MODES.file)
      try {
        await handle.writeFile(data)
        // Data must be on disk before the rename makes the name visible,
        // or a crash could leave a complete-looking name over missing bytes.
        await handle.sync()
      } finally {
        await handle.close()
      }
      await rename(tmp, this.chunkPath(hex))
    } catch (err) {
      this.stats.writeErrors++
      this.log.warn({ chunk: hex, err: errorText(err) }, 'cannot write chunk to the disk cache')
      await rm(tmp, { force: true }).catch(() => {}) // best effort; the next open clears tmp/ anyway
      return
    }
    this.stats.writes++
    this.add(hex, data.length)
    this.maybeEvict()
  }

  private add (hex: string, size: number): void {
    this.index.set(hex, { size })
    this.stats.bytes += size
    this.stats.chunks++
  }

  private forget (hex: string, entry: IndexEntry): void {
    if (this.index.get(hex) !== entry) return
    this.index.delete(hex)
    this.stats.bytes -= entry.size
    this.stats.chunks--
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
    for (const [hex, entry] of this.index) {
      if (this.stats.bytes <= target) break
      this.forget(hex, entry)
      this.stats.evictions++
      this.stats.evictedBytes += entry.size
      victims.push(hex)
    }
    const limit = new Semaphore(UNLINK_CONCURRENCY)
    await Promise.all(victims.map(hex => limit.run(() => this.unlinkChunk(hex))))
  }

  /** A file left behind after a failed unlink is harmless: it is out of the index, and reads verify. */
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

    const found: Array<{ hex: string, size: number, mtimeMs: number }> = []
    const limit = new Semaphore(SCAN_CONCURRENCY)
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
    found.sort((a, b) => a.mtimeMs - b.mtimeMs)
    for (const f of found) this.add(f.hex, f.size)
    this.maybeEvict()
  }
}

/** Makes directory PATH (and its parents) if needed, and leaves it readable by its owner only. */
export async function ownerOnlyDir (path: string): Promise<void> {
  await mkdir(path, { recursive: true, mode: CACHE_MODES.dir })
  await chmod(path, CACHE_MODES.dir)
}
