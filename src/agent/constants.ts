import type { RetryOptions } from '../http/http-retry.ts'

/** Where an agent keeps its cache, catalogs, control socket and peer key unless told otherwise (--state). */
export const DEFAULT_STATE_DIR = '/var/lib/shoal'

/** How the agent's mounts fetch what containers will read (docs/BENCHMARKS.md, "ImageApparate's workloads"). */
export const MOUNT_FETCH_DEFAULTS = {
  /**
   * Chunks resolved at once in the background (readahead, prefetch lists, background
   * fetch; demand reads are not counted). The resolver's own default, 4, leaves a
   * prefetch list of small files mostly round trips: 1,000 files of 4-16 KiB were 250
   * round trips of 4. Neighbours in a pack merge into one range request, so more in
   * flight costs no more requests.
   */
  prefetchConcurrency: 16,
  /**
   * Most chunks kept fetched ahead of one sequential reader: 16 MiB of 1 MiB chunks, 1.3 s
   * of a 100 Mbit/s link. FileReader tops the window up in halves, so a deeper window
   * keeps a request in flight while the reader consumes the last one.
   */
  readaheadChunks: 16,
  /**
   * `shoal run` starts the container once the first this-many bytes of the image's
   * prefetch list (in the order the trace read them) are cached; the rest is fetched
   * right after, while the container runs. A list of a few MB (python, gcc: 6-22 MB)
   * is then waited for whole, so the start-up reads are all hits; a list of a 500 MB
   * file read once is not: waiting for all of it made `cat` start 40 s late and end 5 s
   * later than reading behind the fetch (docs/BENCHMARKS.md, "ImageApparate's workloads").
   */
  prefetchWaitBytes: 64 * 1024 * 1024,
  /** And at most this long, whatever the link (the rest goes on in the background). */
  prefetchWaitMs: 60_000,
  /**
   * Reads of one pack at most this far apart share a range request (the RangeReader's
   * default is 64 KiB). A prefetch list of 1,000 random small files out of 10,000,
   * sorted by pack, merged across 64 KiB gaps sent 24 MB for 12 MB of chunks; on a
   * 100 Mbit/s link a 16 KiB gap costs 1.3 ms, about a loopback round trip, and the
   * requests of a batch go out in parallel anyway.
   */
  rangeMaxGapBytes: 16 * 1024,
  /** Bound on setting up a mount asked for over the control socket (`shoal mount`, `shoal run`): image, signature, catalogs, FUSE. */
  mountTimeoutMs: 120_000
} as const

/** The lazy layers the agent serves to containerd (src/agent/lazy-layers.ts). */
export const LAZY_LAYER_DEFAULTS = {
  /**
   * Finding, verifying and mounting one layer. containerd waits for Prepare, and a
   * layer that is not lazy only costs its download, so a slow registry must not
   * hold a pull for longer than a download would take.
   */
  prepareTimeoutMs: 30_000,
  /** Fetching a conversion's prefetch list in the background gives up after this long. */
  prefetchTimeoutMs: 300_000,
  /** A conversion looked up is reused this long by the other layers of the pull (and the next pull). */
  conversionTtlMs: 60_000,
  /** Registry requests on the Prepare path: fail over to the ordinary download soon rather than retry for long. */
  registryRetry: { retries: 2, requestTimeoutMs: 10_000 } satisfies RetryOptions
} as const
