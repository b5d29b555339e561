import type { RetryOptions } from '../origin/http-retry.ts'

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
