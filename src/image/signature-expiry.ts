/**
 * A signature that expires while its image is mounted (issue 15).
 *
 * The mount goes on serving: its root (manifest → config → catalogs → chunk
 * digests) was verified under a signature valid when it was mounted, and every
 * chunk it serves is still checked against that root, so expiry changes nothing
 * about which bytes are right. Cutting a running container's files off at an
 * instant set months earlier would turn a missed renewal into an outage. What
 * expiry guards against, a stale or replayed image being taken up, is refused
 * where an image is taken up: new mounts, and remounts and snapshotter restores
 * after a restart, all verify the signature again (src/format/signing.ts). The
 * agent warns once, counts the mount in its metrics and shows it in `shoal ls`
 * and `shoal stats`, so that someone re-signs (`shoal sign`) or rolls the
 * workload.
 */

import { DEFAULT_CLOCK_SKEW_MS } from '../format/signing-defaults.ts'

/** setTimeout's longest delay (about 24.8 days); longer waits are re-armed. */
const MAX_TIMER_MS = 2 ** 31 - 1

export interface MountedSignature {
  /** The signature's version and expiry (null: never), as verified at mount. */
  version: number
  expires: string | null
  /** Set once `expires` (and the clock skew allowed) has passed while the image is mounted. */
  expired: boolean
}

/**
 * Calls `onExpired` once `expires` has passed by the clock skew that signature
 * checks allow (DEFAULT_CLOCK_SKEW_MS): from then on a new mount of the image is
 * refused. Not if `signal` aborts first (the image is unmounted); a signature that
 * never expires is not watched.
 */
export function watchExpiry (expires: string | null, signal: AbortSignal, onExpired: () => void, now: () => number = Date.now): void {
  if (expires === null || signal.aborted) return
  const at = Date.parse(expires) + DEFAULT_CLOCK_SKEW_MS
  let timer: NodeJS.Timeout | undefined
  const stop = (): void => clearTimeout(timer)
  const arm = (): void => {
    const wait = at - now()
    if (wait <= 0) {
      signal.removeEventListener('abort', stop)
      onExpired()
      return
    }
    timer = setTimeout(arm, Math.min(wait, MAX_TIMER_MS))
    // An agent with nothing else to do is not kept up by this.
    timer.unref()
  }
  signal.addEventListener('abort', stop, { once: true })
  arm()
}
