import { sleep } from './limit.ts'

/**
 * A rate limit (bytes or requests per second) in two uses: `tryTake` answers yes or no
 * at once (an over-limit upload to a peer is answered with `busy`, and the requester goes
 * to another holder, rather than queued); `take` charges and then sleeps until the bucket
 * has paid the debt back (the origin server's bandwidth cap: callers queue up in call
 * order without a waiter list).
 *
 * Taking may overdraw: a request is admitted whenever the bucket is not empty,
 * and its full size is charged. The average rate holds, one chunk of any size
 * can always pass eventually, and a burst is at most `capacity` plus one chunk.
 */
export class TokenBucket {
  readonly bytesPerSecond: number
  readonly capacity: number
  private tokens: number
  private last: number
  private readonly now: () => number

  /** `bytesPerSecond` Infinity disables the limit. Capacity defaults to one second's worth. */
  constructor (bytesPerSecond: number, options: { capacity?: number, now?: () => number } = {}) {
    if (!(bytesPerSecond > 0)) throw new RangeError(`upload rate must be positive, got ${bytesPerSecond}`)
    this.bytesPerSecond = bytesPerSecond
    this.capacity = options.capacity ?? bytesPerSecond
    this.now = options.now ?? performance.now.bind(performance)
    this.tokens = this.capacity
    this.last = this.now()
  }

  /** Charges `bytes` if the bucket is not empty; false means "over the limit right now". */
  tryTake (bytes: number): boolean {
    if (this.bytesPerSecond === Infinity) return true
    this.refill()
    if (this.tokens <= 0) return false
    this.tokens -= bytes
    return true
  }

  /** Charges `bytes` at once, then waits until the bucket is no longer in debt. An aborted wait gives the bytes back. */
  async take (bytes: number, signal?: AbortSignal): Promise<void> {
    if (this.bytesPerSecond === Infinity) return
    this.refill()
    this.tokens -= bytes
    if (this.tokens >= 0) return
    try {
      await sleep(-this.tokens * 1000 / this.bytesPerSecond, signal)
    } catch (err) {
      this.tokens += bytes
      throw err
    }
  }

  /** How long until `tryTake` would admit (0: now). For callers that wait rather than refuse. */
  waitMs (): number {
    if (this.bytesPerSecond === Infinity) return 0
    this.refill()
    return this.tokens > 0 ? 0 : Math.max(1, Math.ceil(-this.tokens / this.bytesPerSecond * 1000))
  }

  private refill (): void {
    const now = this.now()
    this.tokens = Math.min(this.capacity, this.tokens + (now - this.last) / 1000 * this.bytesPerSecond)
    this.last = now
  }
}
