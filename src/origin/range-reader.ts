import { OriginError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'
import type { Origin } from './origin.ts'

/**
 * Merges small reads of the same blob into fewer, larger origin requests.
 *
 * Reads are collected until the next turn of the event loop (or for `batchWindowMs`);
 * then, per blob, they are sorted by
 * offset and swept into groups: a read joins the current group when it starts
 * within `maxGap` bytes of the group's end and the group stays within
 * `maxRangeBytes` (a single read larger than that is sent alone, unsplit). Each
 * group is one `origin.getRange`, and each read gets a view of its own bytes.
 * The bytes of a gap are fetched and dropped: one request for 64 KiB of waste
 * is cheaper than a second round trip.
 *
 * A read that lies entirely inside a request already in flight joins it
 * instead of waiting for a new one (readahead often asks for what a demand read
 * just asked for).
 *
 * Aborting a read rejects that read only. A merged request keeps going while
 * any of its readers still waits, and is aborted when none does.
 */

export interface RangeReaderOptions {
  origin: Origin
  /** Reads whose gap is at most this many bytes share a request. Default 64 KiB. */
  maxGap?: number
  /** Largest merged request. Default 4 MiB. */
  maxRangeBytes?: number
  /**
   * How long reads are collected before requests go out. Default 0: until the next
   * turn of the event loop (setImmediate), which gathers the reads one FUSE read, a
   * readahead window or a prefetch batch makes together, without delaying a lone miss.
   * (It was 1 ms, which every demand miss paid: a timer of 1 ms fires after 1-2 ms, more
   * on a busy machine, and a container that opens 1,000 small files pays it 1,000 times.)
   */
  batchWindowMs?: number
}

export interface RangeReaderStats {
  /** read() calls, plus each range of readMany(). */
  reads: number
  /** getRange calls sent to the origin. */
  requests: number
  /** Reads that shared a request with another read (merged or joined in flight). */
  merged: number
  /** Bytes the origin returned, gaps included. */
  bytesFetched: number
}

export interface ByteRange {
  offset: number
  length: number
}

interface Reader {
  offset: number
  length: number
  resolve: (data: Uint8Array) => void
  reject: (reason: unknown) => void
  /** Set once the read has been swept into a request. */
  request: Request | undefined
  /** Removes the abort listener; called when the read settles. */
  detach: () => void
}

interface Request {
  blob: Digest
  start: number
  end: number
  readers: Set<Reader>
  controller: AbortController
}

export class RangeReader {
  readonly stats: RangeReaderStats = { reads: 0, requests: 0, merged: 0, bytesFetched: 0 }
  private readonly origin: Origin
  private readonly maxGap: number
  private readonly maxRangeBytes: number
  private readonly batchWindowMs: number
  /** Reads waiting for the batch window to close, per blob. */
  private readonly pending = new Map<Digest, Reader[]>()
  private readonly inFlight = new Map<Digest, Set<Request>>()
  private timer: ReturnType<typeof setTimeout> | ReturnType<typeof setImmediate> | undefined

  constructor (options: RangeReaderOptions) {
    this.origin = options.origin
    this.maxGap = options.maxGap ?? 64 * 1024
    this.maxRangeBytes = options.maxRangeBytes ?? 4 * 1024 * 1024
    this.batchWindowMs = options.batchWindowMs ?? 0
  }

  /** Exactly `length` bytes of BLOB at OFFSET (a view into a possibly larger request). */
  read (blob: Digest, offset: number, length: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    const promise = this.enqueue(blob, offset, length, options.signal)
    this.schedule()
    return promise
  }

  /**
   * A whole blob (a manifest, config or catalog fetched like a chunk). Not a range:
   * a registry serves manifests only as documents under /manifests/, never as
   * ranges of /blobs/.
   */
  async readBlob (blob: Digest, size: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    this.stats.reads++
    this.stats.requests++
    const data = await this.origin.getBlob(blob, { maxBytes: size, ...(options.signal !== undefined ? { signal: options.signal } : {}) })
    this.stats.bytesFetched += data.length
    return data
  }

  /**
   * Several reads known up front (readahead): sent at once, without waiting for
   * the batch window, merged with each other and with reads already pending.
   * Results are in the order of RANGES; any failure rejects the whole call.
   */
  async readMany (blob: Digest, ranges: readonly ByteRange[], options: { signal?: AbortSignal } = {}): Promise<Uint8Array[]> {
    const promises = ranges.map(r => this.enqueue(blob, r.offset, r.length, options.signal))
    this.flushBlob(blob)
    return await Promise.all(promises)
  }

  private enqueue (blob: Digest, offset: number, length: number, signal: AbortSignal | undefined): Promise<Uint8Array> {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      return Promise.reject(new RangeError(`invalid range: offset ${offset}, length ${length}`))
    }
    if (signal?.aborted === true) return Promise.reject(signal.reason)
    this.stats.reads++
    if (length === 0) return Promise.resolve(new Uint8Array(0))

    return new Promise<Uint8Array>((resolve, reject) => {
      const reader: Reader = { offset, length, resolve, reject, request: undefined, detach: () => {} }
      if (signal !== undefined) {
        const onAbort = (): void => this.abandon(blob, reader, signal.reason)
        signal.addEventListener('abort', onAbort, { once: true })
        reader.detach = () => signal.removeEventListener('abort', onAbort)
      }
      const carrier = this.findInFlight(blob, offset, length)
      if (carrier !== undefined) {
        this.stats.merged++
        reader.request = carrier
        carrier.readers.add(reader)
        return
      }
      let list = this.pending.get(blob)
      if (list === undefined) this.pending.set(blob, list = [])
      list.push(reader)
    })
  }

  /** A caller gave up: reject it alone, and abort its request if nobody else wants it. */
  private abandon (blob: Digest, reader: Reader, reason: unknown): void {
    const request = reader.request
    if (request === undefined) {
      const list = this.pending.get(blob)
      const i = list?.indexOf(reader) ?? -1
      if (i >= 0) list!.splice(i, 1)
    } else {
      request.readers.delete(reader)
      if (request.readers.size === 0) request.controller.abort(reason)
    }
    reader.reject(reason)
  }

  private findInFlight (blob: Digest, offset: number, length: number): Request | undefined {
    for (const request of this.inFlight.get(blob) ?? []) {
      if (!request.controller.signal.aborted && request.start <= offset && offset + length <= request.end) return request
    }
    return undefined
  }

  private schedule (): void {
    if (this.timer !== undefined) return
    const flush = (): void => {
      this.timer = undefined
      for (const blob of [...this.pending.keys()]) this.flushBlob(blob)
    }
    this.timer = this.batchWindowMs > 0 ? setTimeout(flush, this.batchWindowMs) : setImmediate(flush)
  }

  /** Sweeps the pending reads of BLOB into merged requests and sends them. */
  private flushBlob (blob: Digest): void {
    const readers = this.pending.get(blob)
    this.pending.delete(blob)
    if (readers === undefined || readers.length === 0) return
    readers.sort((a, b) => a.offset - b.offset)

    let group: Reader[] = []
    let start = 0
    let end = 0
    for (const reader of readers) {
      const readerEnd = reader.offset + reader.length
      const fits = group.length > 0 &&
        reader.offset <= end + this.maxGap &&
        Math.max(end, readerEnd) - start <= this.maxRangeBytes
      if (fits) {
        end = Math.max(end, readerEnd)
        group.push(reader)
        continue
      }
      if (group.length > 0) this.send(blob, start, end, group)
      group = [reader]
      start = reader.offset
      end = readerEnd
    }
    this.send(blob, start, end, group)
  }

  private send (blob: Digest, start: number, end: number, readers: Reader[]): void {
    const request: Request = { blob, start, end, readers: new Set(readers), controller: new AbortController() }
    for (const reader of readers) reader.request = request
    this.stats.requests++
    this.stats.merged += readers.length - 1
    let flying = this.inFlight.get(blob)
    if (flying === undefined) this.inFlight.set(blob, flying = new Set())
    flying.add(request)

    void this.fetch(request, flying)
  }

  private async fetch (request: Request, flying: Set<Request>): Promise<void> {
    const { blob, start, end } = request
    let data: Uint8Array | undefined
    let error: unknown
    try {
      const got = await this.origin.getRange(blob, start, end - start, { signal: request.controller.signal })
      // Origins promise exact lengths; a wrong one here would hand readers wrong bytes.
      if (got.length !== end - start) {
        throw new OriginError(`blob ${blob} bytes ${start}-${end - 1}: ${this.origin.name} returned ${got.length} bytes instead of ${end - start}`, { retryable: true })
      }
      this.stats.bytesFetched += got.length
      data = got
    } catch (err) {
      error = err
    } finally {
      flying.delete(request)
      if (flying.size === 0 && this.inFlight.get(blob) === flying) this.inFlight.delete(blob)
    }
    for (const reader of request.readers) {
      reader.detach()
      if (data === undefined) reader.reject(error)
      else reader.resolve(data.subarray(reader.offset - start, reader.offset - start + reader.length))
    }
    request.readers.clear()
  }
}
