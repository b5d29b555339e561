import type { ChunkRef } from '../format/catalog.ts'
import type { Digest } from '../oci/digest.ts'
import type { PrefetchResult } from '../fetch/resolver.ts'
import { sleep } from '../util/limit.ts'

/**
 * Background fetch: once a mount's start-up reads are served, stream the rest of the
 * image into the disk cache at link speed, so that a workload that ends up reading
 * most of its image is not slower than a full pull (the stargz snapshotter is reported
 * 1.5-1.8x slower than a plain pull when a job reads 8 GB of its image: every miss a
 * round trip, never a stream). Off by default (`--background-fetch`, config
 * `backgroundFetch`): most containers read a few percent of their image, and on a
 * shared link the rest is bytes nobody asked for.
 *
 * The policy, in order:
 * 1. wait for `startAfter` (the image's prefetch list, when it has one);
 * 2. wait until the mount has had no demand miss (a read that waited for a peer or the
 *    origin) for `quietMs`: the container's start-up reads go first;
 * 3. fetch every chunk of every layer, pack by pack in pack order (the RangeReader then
 *    merges neighbours into large range requests), each digest once, through the
 *    resolver's prefetch API (its background budget, to disk only, skipping what is
 *    cached), `sliceChunks` at a time, waiting for quiet again before each slice so that
 *    a container that starts missing again gets the link back within a slice.
 * It stops when `signal` aborts (the mount goes away).
 */

export const BACKGROUND_FETCH_DEFAULTS = {
  /** No demand miss for this long means the start-up reads are served. */
  quietMs: 300,
  /**
   * Chunks handed to the resolver per slice. A slice is at most this many chunks of
   * link time ahead of a demand read that comes during it (64 MiB of 1 MiB chunks is
   * 5 s at 100 Mbit/s; the resolver's budget keeps only a few in flight at once, and a
   * demand read does not wait for the budget, only for the link).
   */
  sliceChunks: 64
} as const

/** What background fetch needs of a layer's catalog. */
export interface PackLister {
  packs (): Array<{ digest: Digest }>
  packChunks (pack: Digest): ChunkRef[]
}

export interface BackgroundFetchOptions {
  /** The image's layers, bottom first. */
  catalogs: readonly PackLister[]
  prefetch: (chunks: ChunkRef[], options: { signal: AbortSignal }) => Promise<PrefetchResult>
  /** Milliseconds since the mount's last demand miss (Infinity if none yet). */
  sinceLastMiss: () => number
  signal: AbortSignal
  startAfter?: Promise<unknown>
  quietMs?: number
  sliceChunks?: number
}

export interface BackgroundFetchResult extends PrefetchResult {
  /** Whether it went through the whole image (false: aborted). */
  complete: boolean
}

/** Every chunk of CATALOGS, each digest once: layer by layer, pack by pack, in pack order. */
export function imageChunksInPackOrder (catalogs: readonly PackLister[]): ChunkRef[] {
  const seen = new Set<Digest>()
  const out: ChunkRef[] = []
  for (const catalog of catalogs) {
    for (const pack of catalog.packs()) {
      for (const chunk of catalog.packChunks(pack.digest)) {
        if (seen.has(chunk.digest)) continue
        seen.add(chunk.digest)
        out.push(chunk)
      }
    }
  }
  return out
}

export async function backgroundFetch (options: BackgroundFetchOptions): Promise<BackgroundFetchResult> {
  const quietMs = options.quietMs ?? BACKGROUND_FETCH_DEFAULTS.quietMs
  const sliceChunks = options.sliceChunks ?? BACKGROUND_FETCH_DEFAULTS.sliceChunks
  const { signal } = options
  const result: BackgroundFetchResult = { requested: 0, cached: 0, resolved: 0, failed: 0, complete: false }
  try {
    await options.startAfter?.catch(() => {})
    const chunks = imageChunksInPackOrder(options.catalogs)
    for (let at = 0; at < chunks.length; at += sliceChunks) {
      await waitForQuiet(options.sinceLastMiss, quietMs, signal)
      const r = await options.prefetch(chunks.slice(at, at + sliceChunks), { signal })
      result.requested += r.requested
      result.cached += r.cached
      result.resolved += r.resolved
      result.failed += r.failed
      signal.throwIfAborted()
    }
    result.complete = true
  } catch (err) {
    if (!signal.aborted) throw err
  }
  return result
}

/** Resolves once no demand miss happened for QUIET_MS. */
async function waitForQuiet (sinceLastMiss: () => number, quietMs: number, signal: AbortSignal): Promise<void> {
  for (;;) {
    signal.throwIfAborted()
    const since = sinceLastMiss()
    if (since >= quietMs) return
    await sleep(quietMs - since, signal)
  }
}
