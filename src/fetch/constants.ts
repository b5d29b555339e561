/**
 * The chunk resolver's defaults, in a module of their own: the peer source budgets
 * its waits against the chunk timeout, and the simulation model runs the same
 * passes, without loading the resolver and its caches.
 */
export const RESOLVER_DEFAULTS = {
  /** Bound on one chunk resolution, retries included (--chunk-timeout). */
  timeoutMs: 20_000,
  /** Passes over the remote sources (peers, then the origin) before giving up. */
  attempts: 3,
  /** Pause before the second pass; it doubles for each further pass. */
  retryDelayMs: 200,
  /** Chunks being prefetched at once, over all prefetch calls (the agent sets its own: MOUNT_FETCH_DEFAULTS). */
  prefetchConcurrency: 4
} as const
