/**
 * Small waiting primitives for the origin clients: a counting semaphore that
 * bounds in-flight requests, and an abortable sleep for retry backoff.
 * Every wait takes an AbortSignal and rejects with the signal's reason, so a
 * caller that gives up is never left waiting for a slot or a timer.
 */

interface Waiter {
  grant: () => void
  reject: (reason: unknown) => void
  signal: AbortSignal | undefined
  onAbort: (() => void) | undefined
}

/** A FIFO counting semaphore: at most `max` holders at a time. */
export class Semaphore {
  readonly max: number
  private held = 0
  private readonly queue: Waiter[] = []

  constructor (max: number) {
    if (!Number.isInteger(max) || max < 1) throw new RangeError(`semaphore size must be a positive integer, got ${max}`)
    this.max = max
  }

  /** Holders right now (for tests and metrics). */
  get active (): number { return this.held }
  /** Callers waiting for a slot. */
  get waiting (): number { return this.queue.length }

  /** Waits for a slot; the returned function gives it back (calling it twice is harmless). */
  acquire (signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted === true) return Promise.reject(signal.reason)
    if (this.held < this.max) {
      this.held++
      return Promise.resolve(this.releaser())
    }
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        grant: () => {
          if (waiter.onAbort !== undefined) signal?.removeEventListener('abort', waiter.onAbort)
          resolve(this.releaser())
        },
        reject,
        signal,
        onAbort: undefined
      }
      if (signal !== undefined) {
        waiter.onAbort = () => {
          const i = this.queue.indexOf(waiter)
          if (i >= 0) this.queue.splice(i, 1)
          reject(signal.reason)
        }
        signal.addEventListener('abort', waiter.onAbort, { once: true })
      }
      this.queue.push(waiter)
    })
  }

  /** Runs FN while holding a slot. */
  async run<T> (fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const release = await this.acquire(signal)
    try { return await fn() } finally { release() }
  }

  private releaser (): () => void {
    let released = false
    return () => {
      if (released) return
      released = true
      // Hand the slot straight to the next waiter, so `held` never dips and a
      // newcomer cannot overtake the queue.
      const next = this.queue.shift()
      if (next !== undefined) next.grant()
      else this.held--
    }
  }
}

/** Resolves after `ms`, or rejects with `signal.reason` as soon as the signal aborts. */
export function sleep (ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted === true) return Promise.reject(signal.reason)
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal!.reason)
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** Waits for PROMISE, or rejects with the signal's reason as soon as SIGNAL aborts, whichever comes first (the work goes on). */
export function abortable<T> (promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason)
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
  })
}
