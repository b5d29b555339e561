import type { Extent } from '../format/catalog.ts'
import type { ChunkResolver, ServedHook } from './resolver.ts'

/**
 * Reads of one open file: maps a byte range to the extents it touches and has
 * the resolver copy the overlapping bytes of each into the caller's buffer, in
 * parallel, in O(log extents + extents touched). Nothing is allocated per read:
 * memory hits are copied at once (a read made only of them returns a number, not
 * a promise), verified disk chunks are pread straight into the buffer.
 *
 * Readahead: when reads move forward through the file (each one starts near
 * where the previous ended), the chunks after the current one are prefetched,
 * keeping a window that doubles with each sequential read up to
 * `readaheadChunks`. The converter lays a file's chunks out next to each other
 * in its pack, so the RangeReader turns a window into one range request. The
 * window is refilled only once half of it has been consumed, so requests stay
 * large instead of one chunk per read. A read elsewhere (random access, e.g. a
 * loader jumping around a library) resets the window: no bytes are prefetched
 * for patterns that would not use them.
 */

export interface FileReaderOptions {
  /** Most chunks kept prefetched ahead of a sequential reader. Default 8; 0 disables readahead. */
  readaheadChunks?: number
  /** Per-image accounting of which source served each chunk a read needed. */
  onServed?: ServedHook
  /** Aborts readahead, e.g. when the mount goes away (`close` stops it too). */
  signal?: AbortSignal
}

/** How far (bytes) a read may start from where the last one ended and still count as sequential: reads from several kernel threads can arrive slightly out of order. */
const SEQUENTIAL_SLACK = 512 * 1024

export class FileReader {
  private readonly resolver: ChunkResolver
  private readonly extents: readonly Extent[]
  private readonly size: number
  private readonly maxWindow: number
  private readonly onServed: ServedHook | undefined
  private readonly signal: AbortSignal | undefined
  /** Made at the first readahead: most files (small ones, random readers) never need one. */
  private ahead: { controller: AbortController, signal: AbortSignal } | undefined
  /** Where the next read of a sequential reader would start. */
  private nextOffset = 0
  private window = 0
  /** Extents below this index have been handed to readahead already. */
  private prefetchedTo = 0

  constructor (resolver: ChunkResolver, extents: readonly Extent[], size: number, options: FileReaderOptions = {}) {
    this.resolver = resolver
    this.extents = extents
    this.size = size
    this.maxWindow = options.readaheadChunks ?? 8
    this.onServed = options.onServed
    this.signal = options.signal
  }

  /** Stops this file's readahead (the file was closed). */
  close (): void {
    this.ahead?.controller.abort()
  }

  /**
   * Fills TARGET with up to LENGTH bytes of the file from OFFSET and returns how
   * many there were (fewer at the end of the file): a number when every byte
   * came from memory, else a promise. The promise rejects with the resolver's
   * ChunkUnavailableError when a chunk cannot be had.
   */
  read (target: Uint8Array, offset: number, length: number, signal: AbortSignal): number | Promise<number> {
    const end = Math.min(this.size, offset + Math.min(length, target.length))
    if (offset >= end) return 0
    const first = this.extentAt(offset)
    let last = first
    while (last < this.extents.length && this.extents[last]!.fileOffset < end) last++
    this.readahead(offset, end, last)

    let pending: Array<Promise<void>> | undefined
    let filled = offset
    for (let i = first; i < last; i++) {
      const extent = this.extents[i]!
      const from = Math.max(offset, extent.fileOffset)
      const to = Math.min(end, extent.fileOffset + extent.length)
      if (from >= to) continue
      // A gap between extents reads as zeros (a hole), never as stale buffer contents.
      if (from > filled) target.fill(0, filled - offset, from - offset)
      const done = this.resolver.read(extent, target, from - offset, from - extent.fileOffset, to - from, { signal, onServed: this.onServed })
      if (done !== undefined) (pending ??= []).push(done)
      filled = to
    }
    if (filled < end) target.fill(0, filled - offset, end - offset)
    const n = end - offset
    if (pending === undefined) return n
    return pending.length === 1 ? pending[0]!.then(() => n) : Promise.all(pending).then(() => n)
  }

  /** Index of the extent holding OFFSET (or the first one after it, in a hole). */
  private extentAt (offset: number): number {
    let lo = 0
    let hi = this.extents.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      const e = this.extents[mid]!
      if (e.fileOffset + e.length <= offset) lo = mid + 1
      else hi = mid
    }
    return lo
  }

  /** Updates the access pattern with a read of [OFFSET, END) whose extents end before index AFTER. */
  private readahead (offset: number, end: number, after: number): void {
    if (this.maxWindow === 0) return
    const sequential = offset >= this.nextOffset - SEQUENTIAL_SLACK && offset <= this.nextOffset + SEQUENTIAL_SLACK
    this.nextOffset = end
    if (!sequential) {
      this.window = 0
      this.prefetchedTo = after
      return
    }
    this.window = Math.min(this.maxWindow, Math.max(1, this.window * 2))
    const from = Math.max(after, this.prefetchedTo)
    const to = Math.min(this.extents.length, after + this.window)
    // Top up in batches of half a window, except for the last chunks of the file.
    if (to <= from || (to - from < Math.max(1, this.window >> 1) && to < this.extents.length)) return
    this.prefetchedTo = to
    if (this.ahead === undefined) {
      const controller = new AbortController()
      this.ahead = { controller, signal: this.signal === undefined ? controller.signal : AbortSignal.any([controller.signal, this.signal]) }
    }
    // prefetch() never rejects; a chunk it could not get fails the read that needs it.
    void this.resolver.prefetch(this.extents.slice(from, to), { signal: this.ahead.signal, keepInMemory: true })
  }
}
