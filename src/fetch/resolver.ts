import { DISK_CACHE_DEFAULTS } from '../cache/disk-cache.ts'
import { MemoryCache } from '../cache/memory-cache.ts'
import { IntegrityError } from '../errors.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import { systemClock, type Clock } from '../util/clock.ts'
import { abortable, Semaphore } from '../util/limit.ts'
import type { ChunkCache, ChunkSource } from './chunk-source.ts'
import { ChunkUnavailableError, type SourceFailure } from './errors.ts'
import { errorText, silentLogger, type Logger } from '../util/log.ts'
import { RESOLVER_DEFAULTS } from './constants.ts'

/**
 * The chunk resolver: the one place the read path gets chunk bytes from.
 *
 * Order: memory → disk cache → each remote source in order (peers, then the
 * origin), repeated up to `attempts` times with backoff. Everything that comes
 * from a remote source is checked for length and SHA-256 against the ChunkRef
 * (which comes from a verified catalog) before it is cached or returned; bad
 * bytes are counted per source, logged, and the next source is asked.
 *
 * The disk cache holds only bytes that passed those checks, so it is verified
 * once per process, not per read (docs/ARCHITECTURE.md, "Trust boundary"): a
 * chunk the cache marks verified (written, or hashed, by this process) is read
 * with a pread of just the bytes asked for (`read`); one found on disk at start
 * is read whole and hashed on its first use, then marked. A wrong length (at
 * open, or a short read) is a verification failure like a wrong hash: the file
 * is removed and the chunk fetched again.
 *
 * Concurrent requests for a digest share one resolution (singleflight). A caller
 * that gives up leaves alone; the shared resolution is aborted only when nobody
 * waits for it any more. Each resolution is bounded by `timeoutMs`, retries
 * included, after which its callers get a ChunkUnavailableError: a read never
 * hangs on a dead origin.
 *
 * Prefetch (readahead, the image's prefetch list) runs the same resolutions under
 * its own small concurrency budget, so it fills caches without queueing ahead
 * of the reads an application is blocked on.
 *
 * Transport-free: time comes from a Clock, the cache and sources are interfaces,
 * so the simulation model runs this very class for each of its nodes, in simulated time.
 */

export interface ChunkResolverOptions {
  disk: ChunkCache
  /** Asked in order after the disk cache: peers first, then the origin. */
  remote: readonly ChunkSource[]
  /** Default: a 64 MiB MemoryCache. */
  memory?: MemoryCache
  /** Bound on one chunk resolution, retries included. Default RESOLVER_DEFAULTS (all four). */
  timeoutMs?: number
  /** Passes over the remote sources before giving up. */
  attempts?: number
  /** Pause before the second pass; it doubles for each further pass. */
  retryDelayMs?: number
  /** Chunks being prefetched at once, over all prefetch calls. */
  prefetchConcurrency?: number
  /** Called for every resolution, failure and bad chunk: the agent's metrics hook. */
  onEvent?: (event: ResolverEvent) => void
  log?: Logger
  /** Default: the system clock (the simulation model passes its own). */
  clock?: Clock
  /**
   * Why DATA, of the right length, is not CHUNK's content (undefined when it is).
   * Default: its SHA-256 against the chunk's digest. The simulation model, whose
   * chunks carry no real bytes, passes its own.
   */
  verify?: (chunk: ChunkRef, data: Uint8Array) => string | undefined
}

export type ResolverEvent =
  /**
   * A chunk was resolved: on every memory hit, and once per shared resolution
   * from the disk or a remote source (callers that joined it add no event).
   */
  | { type: 'resolved', digest: Digest, source: string, bytes: number, ms: number }
  | { type: 'verification-failure', digest: Digest, source: string, reason: string }
  | { type: 'unavailable', digest: Digest, ms: number, message: string }

export interface ResolverStats {
  /**
   * Chunks and bytes by the source that produced them. A resolution shared by
   * several callers counts once, so `origin` is what the origin really sent.
   * A `read` served by a pread of a verified disk chunk counts as one `disk`
   * chunk of the bytes it read.
   */
  sources: Record<string, { chunks: number, bytes: number }>
  /** Callers that joined a resolution already in flight. */
  joined: number
  /** Chunks that failed length or SHA-256 checks (or did not decode), by source. */
  verificationFailures: Record<string, number>
  /** Resolutions that failed for good (each one an EIO for some reader). */
  unavailable: number
}

export interface PrefetchResult {
  /** Distinct chunks asked for. */
  requested: number
  /** Already cached (memory, or disk when the chunks need not be in memory). */
  cached: number
  resolved: number
  failed: number
}

/** Told which source answered a caller (for per-image accounting); a shared fetch reports its source to every caller. */
export type ServedHook = (source: string, bytes: number) => void

interface Flight {
  promise: Promise<{ data: Uint8Array, source: string }>
  controller: AbortController
  waiters: number
  settled: boolean
  /** Whether the bytes go to the memory cache: a read (or readahead) wants them soon. */
  keepInMemory: boolean
}

export class ChunkResolver {
  readonly stats: ResolverStats
  readonly timeoutMs: number
  readonly memory: MemoryCache
  private readonly disk: ChunkCache
  private readonly remote: readonly ChunkSource[]
  private readonly attempts: number
  private readonly retryDelayMs: number
  private readonly prefetchLimit: Semaphore
  private readonly onEvent: ((event: ResolverEvent) => void) | undefined
  private readonly log: Logger
  private readonly clock: Clock
  private readonly verify: (chunk: ChunkRef, data: Uint8Array) => string | undefined
  private readonly flights = new Map<Digest, Flight>()

  constructor (options: ChunkResolverOptions) {
    this.disk = options.disk
    this.remote = options.remote
    this.memory = options.memory ?? new MemoryCache()
    this.timeoutMs = options.timeoutMs ?? RESOLVER_DEFAULTS.timeoutMs
    this.attempts = options.attempts ?? RESOLVER_DEFAULTS.attempts
    this.retryDelayMs = options.retryDelayMs ?? RESOLVER_DEFAULTS.retryDelayMs
    this.prefetchLimit = new Semaphore(options.prefetchConcurrency ?? RESOLVER_DEFAULTS.prefetchConcurrency)
    this.onEvent = options.onEvent
    this.log = options.log ?? silentLogger
    this.clock = options.clock ?? systemClock
    this.verify = options.verify ?? contentProblem
    if (!(this.timeoutMs > 0)) throw new RangeError(`resolver timeout must be positive, got ${this.timeoutMs}`)
    if (!Number.isInteger(this.attempts) || this.attempts < 1) throw new RangeError(`resolver attempts must be a positive integer, got ${this.attempts}`)
    const names = ['memory', 'disk', ...this.remote.map(s => s.name)]
    this.stats = {
      sources: Object.fromEntries(names.map(n => [n, { chunks: 0, bytes: 0 }])),
      joined: 0,
      verificationFailures: Object.fromEntries(names.slice(1).map(n => [n, 0])),
      unavailable: 0
    }
  }

  /**
   * The verified bytes of CHUNK. Rejects with ChunkUnavailableError when no source
   * has good bytes within the timeout, or with the signal's reason on abort.
   * The returned array is shared (with the cache and other callers): do not modify it.
   */
  async get (chunk: ChunkRef, options: { signal: AbortSignal, onServed?: ServedHook }): Promise<Uint8Array> {
    return await this.resolve(chunk, options.signal, true, options.onServed)
  }

  /**
   * Copies LENGTH bytes of CHUNK, from CHUNK_OFFSET, into TARGET at TARGET_OFFSET.
   * Returns undefined when that is done already (a memory hit: no promise, no
   * allocation), else a promise. A chunk verified in the disk cache is read with
   * one pread of the bytes asked for; anything else is resolved whole (`get`).
   */
  read (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number, options: { signal: AbortSignal, onServed?: ServedHook | undefined }): Promise<void> | undefined {
    const started = this.clock.now()
    const hit = this.memory.get(chunk.digest)
    if (hit !== undefined) {
      target.set(hit.subarray(chunkOffset, chunkOffset + length), targetOffset)
      this.served('memory', chunk.digest, hit.length, started)
      options.onServed?.('memory', hit.length)
      return undefined
    }
    if (this.disk.isVerified(chunk.digest)) {
      let done: boolean
      try {
        done = this.disk.tryReadSync(chunk, target, targetOffset, chunkOffset, length)
      } catch (err) {
        return this.diskReadFailed(chunk, err).then(async () => await this.readWhole(chunk, target, targetOffset, chunkOffset, length, options.signal, options.onServed))
      }
      if (done) {
        this.served('disk', chunk.digest, length, started)
        options.onServed?.('disk', length)
        return undefined
      }
    } else if (chunk.length <= DISK_CACHE_DEFAULTS.syncReadMaxBytes && this.disk.has(chunk.digest) && !this.flights.has(chunk.digest)) {
      // The first use of a small chunk found on disk (a small file after a restart): read
      // whole and hashed right here (microseconds), rather than through a flight and the thread pool.
      const data = Buffer.allocUnsafe(chunk.length)
      let problem: string | undefined
      try {
        if (this.disk.tryReadSync(chunk, data, 0, 0, chunk.length)) problem = this.verificationProblem(chunk, data) ?? ''
      } catch (err) {
        return this.diskReadFailed(chunk, err).then(async () => await this.readWhole(chunk, target, targetOffset, chunkOffset, length, options.signal, options.onServed))
      }
      if (problem === '') {
        this.disk.markVerified(chunk.digest)
        this.memory.set(chunk.digest, data)
        target.set(data.subarray(chunkOffset, chunkOffset + length), targetOffset)
        this.served('disk', chunk.digest, chunk.length, started)
        options.onServed?.('disk', chunk.length)
        return undefined
      }
      if (problem !== undefined) {
        return this.diskReadFailed(chunk, new IntegrityError(`chunk ${chunk.digest} in the disk cache`, problem))
          .then(async () => await this.readWhole(chunk, target, targetOffset, chunkOffset, length, options.signal, options.onServed))
      }
    }
    return this.readSlow(chunk, target, targetOffset, chunkOffset, length, options.signal, options.onServed)
  }

  private async readSlow (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number, signal: AbortSignal, onServed: ServedHook | undefined): Promise<void> {
    signal.throwIfAborted()
    if (this.disk.isVerified(chunk.digest)) {
      const started = this.clock.now()
      try {
        if (await this.disk.readInto(chunk, target, targetOffset, chunkOffset, length)) {
          this.served('disk', chunk.digest, length, started)
          onServed?.('disk', length)
          return
        }
      } catch (err) {
        await this.diskReadFailed(chunk, err)
      }
      // Gone, damaged or unreadable: resolved whole below (the disk is asked again only if it still has the chunk).
    }
    await this.readWhole(chunk, target, targetOffset, chunkOffset, length, signal, onServed)
  }

  private async readWhole (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number, signal: AbortSignal, onServed: ServedHook | undefined): Promise<void> {
    const data = await this.resolve(chunk, signal, true, onServed)
    target.set(data.subarray(chunkOffset, chunkOffset + length), targetOffset)
  }

  /** A pread of a verified chunk failed: a damaged file (wrong length, short read) is removed; other errors only logged. */
  private async diskReadFailed (chunk: ChunkRef, err: unknown): Promise<void> {
    if (err instanceof IntegrityError) {
      this.badChunk('disk', chunk, err.message)
      await this.disk.remove(chunk.digest)
    } else {
      this.log.debug({ chunk: chunk.digest, source: 'disk', err: errorText(err) }, 'chunk source failed')
    }
  }

  /**
   * Resolves CHUNKS in the background budget, skipping what is cached. With
   * `keepInMemory` (readahead) the bytes also go to the memory cache, for a read
   * that is about to come; otherwise (the image prefetch list) only to disk.
   * Never rejects: failures are counted, and a later read will report its own.
   */
  async prefetch (chunks: Iterable<ChunkRef>, options: { signal: AbortSignal, keepInMemory?: boolean }): Promise<PrefetchResult> {
    const keepInMemory = options.keepInMemory ?? false
    const unique = new Map<Digest, ChunkRef>()
    for (const chunk of chunks) unique.set(chunk.digest, chunk)
    const result: PrefetchResult = { requested: unique.size, cached: 0, resolved: 0, failed: 0 }
    const todo = [...unique.values()].filter(chunk => {
      // A verified disk chunk needs nothing ahead of a read: `read` preads it. One not yet
      // verified is worth reading ahead: its first use hashes it whole, off the reader's path.
      const cached = this.memory.has(chunk.digest) || (keepInMemory ? this.disk.isVerified(chunk.digest) : this.disk.has(chunk.digest))
      if (cached) result.cached++
      return !cached
    })
    // One worker per budget slot, each taking the next chunk: a long list does
    // not queue thousands of waiters on the shared semaphore.
    let next = 0
    const worker = async (): Promise<void> => {
      while (next < todo.length && !options.signal.aborted) {
        const chunk = todo[next++]!
        try {
          await this.prefetchLimit.run(() => this.resolve(chunk, options.signal, keepInMemory), options.signal)
          result.resolved++
        } catch (err) {
          if (options.signal.aborted) break
          result.failed++
          this.log.debug({ chunk: chunk.digest, err: errorText(err) }, 'prefetch failed')
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(this.prefetchLimit.max, todo.length) }, worker))
    return result
  }

  private async resolve (chunk: ChunkRef, signal: AbortSignal, keepInMemory: boolean, onServed?: ServedHook): Promise<Uint8Array> {
    signal.throwIfAborted()
    const started = this.clock.now()
    const hit = this.memory.get(chunk.digest)
    if (hit !== undefined) {
      this.served('memory', chunk.digest, hit.length, started)
      onServed?.('memory', hit.length)
      return hit
    }
    let flight = this.flights.get(chunk.digest)
    if (flight === undefined) flight = this.startFlight(chunk)
    else this.stats.joined++
    flight.keepInMemory ||= keepInMemory

    flight.waiters++
    try {
      const { data, source } = await abortable(flight.promise, signal)
      onServed?.(source, data.length)
      return data
    } finally {
      if (--flight.waiters === 0 && !flight.settled) {
        // Every caller gave up: stop fetching what nobody wants.
        this.flights.delete(chunk.digest)
        flight.controller.abort(signal.reason)
      }
    }
  }

  private startFlight (chunk: ChunkRef): Flight {
    const state = { controller: new AbortController(), waiters: 0, settled: false, keepInMemory: false }
    const flight: Flight = Object.assign(state, {
      promise: this.fetch(chunk, state).finally(() => {
        state.settled = true
        if (this.flights.get(chunk.digest) === flight) this.flights.delete(chunk.digest)
      })
    })
    // Rejections reach the callers through `abortable`; this only keeps a flight
    // whose callers all left from being reported as unhandled.
    flight.promise.catch(() => {})
    this.flights.set(chunk.digest, flight)
    return flight
  }

  private async fetch (chunk: ChunkRef, flight: Omit<Flight, 'promise'>): Promise<{ data: Uint8Array, source: string }> {
    const started = this.clock.now()
    const timeout = this.clock.timeout(this.timeoutMs)
    const signal = AbortSignal.any([flight.controller.signal, timeout])
    const failures = new Map<string, string>()
    try {
      const { data, source } = await this.fetchFromSources(chunk, signal, failures)
      if (flight.keepInMemory) this.memory.set(chunk.digest, data)
      // In the background: the reader should not wait for the disk.
      if (source !== 'disk') void this.disk.put(chunk.digest, data)
      this.served(source, chunk.digest, data.length, started)
      return { data, source }
    } catch (err) {
      if (flight.controller.signal.aborted) throw err // every caller left; nobody sees this
      const list: SourceFailure[] = [...failures].map(([source, reason]) => ({ source, reason }))
      const error = timeout.aborted
        ? new ChunkUnavailableError(chunk.digest, `was not resolved within ${this.timeoutMs} ms`, list)
        : err instanceof ChunkUnavailableError ? err : new ChunkUnavailableError(chunk.digest, `could not be resolved (${errorText(err)})`, list)
      this.stats.unavailable++
      this.log.warn({ chunk: chunk.digest, err: error.message }, 'chunk unavailable')
      this.onEvent?.({ type: 'unavailable', digest: chunk.digest, ms: this.clock.now() - started, message: error.message })
      throw error
    }
  }

  private async fetchFromSources (chunk: ChunkRef, signal: AbortSignal, failures: Map<string, string>): Promise<{ data: Uint8Array, source: string }> {
    const fromDisk = await this.tryDisk(chunk, signal, failures)
    if (fromDisk !== undefined) return { data: fromDisk, source: 'disk' }
    for (let attempt = 0; attempt < this.attempts; attempt++) {
      if (attempt > 0) await this.clock.sleep(this.retryDelayMs * 2 ** (attempt - 1), signal)
      for (const source of this.remote) {
        const data = await this.trySource(source, chunk, signal, failures)
        if (data !== undefined) return { data, source: source.name }
      }
    }
    const summary = failures.size === 0 ? 'is not held by any source' : `could not be fetched from any source (${this.attempts} attempts)`
    throw new ChunkUnavailableError(chunk.digest, summary, [...failures].map(([source, reason]) => ({ source, reason })))
  }

  private async tryDisk (chunk: ChunkRef, signal: AbortSignal, failures: Map<string, string>): Promise<Uint8Array | undefined> {
    // Verified by this process already: only the length is checked again (see the class comment).
    const verified = this.disk.isVerified(chunk.digest)
    const data = await this.trySource(this.disk, chunk, signal, failures, verified)
    if (data === undefined && failures.has('disk')) await this.disk.remove(chunk.digest)
    if (data !== undefined && !verified) this.disk.markVerified(chunk.digest)
    return data
  }

  /** Verified bytes from SOURCE, or undefined (it lacks them, failed, or sent bad bytes: recorded in FAILURES). TRUSTED: check the length only. */
  private async trySource (source: ChunkSource, chunk: ChunkRef, signal: AbortSignal, failures: Map<string, string>, trusted = false): Promise<Uint8Array | undefined> {
    let data: Uint8Array | undefined
    try {
      data = await abortable(source.get(chunk, { signal }), signal)
    } catch (err) {
      if (signal.aborted) throw err
      if (err instanceof IntegrityError) this.badChunk(source.name, chunk, err.message)
      else this.log.debug({ chunk: chunk.digest, source: source.name, err: errorText(err) }, 'chunk source failed')
      failures.set(source.name, errorText(err))
      return undefined
    }
    if (data === undefined) return undefined
    const problem = trusted ? lengthProblem(chunk, data) : this.verificationProblem(chunk, data)
    if (problem === undefined) return data
    this.badChunk(source.name, chunk, problem)
    failures.set(source.name, problem)
    return undefined
  }

  private badChunk (source: string, chunk: ChunkRef, reason: string): void {
    this.stats.verificationFailures[source] = (this.stats.verificationFailures[source] ?? 0) + 1
    this.log.warn({ chunk: chunk.digest, pack: chunk.pack, source, reason }, 'chunk failed verification')
    this.onEvent?.({ type: 'verification-failure', digest: chunk.digest, source, reason })
  }

  /** Why DATA is not CHUNK, or undefined when it is. */
  private verificationProblem (chunk: ChunkRef, data: Uint8Array): string | undefined {
    return lengthProblem(chunk, data) ?? this.verify(chunk, data)
  }

  private served (source: string, digest: Digest, bytes: number, started: number): void {
    const counter = this.stats.sources[source] ??= { chunks: 0, bytes: 0 }
    counter.chunks++
    counter.bytes += bytes
    this.onEvent?.({ type: 'resolved', digest, source, bytes, ms: this.clock.now() - started })
  }
}

/** The default content check: the SHA-256 of DATA against CHUNK's digest. */
function contentProblem (chunk: ChunkRef, data: Uint8Array): string | undefined {
  const actual = sha256(data)
  return actual === chunk.digest ? undefined : `content hashes to ${actual}`
}

function lengthProblem (chunk: ChunkRef, data: Uint8Array): string | undefined {
  return data.length === chunk.length ? undefined : `${data.length} bytes instead of ${chunk.length}`
}
