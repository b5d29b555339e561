/**
 * The discrete-event core of the model: a binary-heap event queue and a clock,
 * plus the few primitives the node logic is written with (sleep, timeout
 * signals, deferred promises), so that logic can read like the agent's own
 * async code while time is simulated.
 *
 * Promises and simulated time: an event's callback may start or resume async
 * code whose continuations must run at that same simulated instant, before the
 * clock moves on. So after an event the loop yields to a macrotask, by which
 * point Node has drained every microtask. The bulk of events (a link serving a
 * 64 KiB piece) are `quiet`: they touch no promise unless they call `wake()`,
 * and cost no yield.
 */

interface Event { t: number, seq: number, fn: () => void, quiet: boolean }

/** A min-heap of events by time, then by insertion order (so same-time events run FIFO). */
export class EventQueue {
  private readonly heap: Event[] = []
  private seq = 0

  get size (): number { return this.heap.length }

  /** The earliest event's time, without removing it. */
  peekTime (): number | undefined { return this.heap[0]?.t }

  push (t: number, fn: () => void, quiet = false): void {
    const h = this.heap
    const e = { t, seq: this.seq++, fn, quiet }
    let i = h.length
    h.push(e)
    while (i > 0) {
      const p = (i - 1) >> 1
      if (!before(e, h[p]!)) break
      h[i] = h[p]!
      i = p
    }
    h[i] = e
  }

  pop (): Event | undefined {
    const h = this.heap
    const top = h[0]
    const last = h.pop()
    if (top === undefined || last === undefined || h.length === 0) return top
    let i = 0
    for (;;) {
      const l = 2 * i + 1
      if (l >= h.length) break
      const r = l + 1
      const c = r < h.length && before(h[r]!, h[l]!) ? r : l
      if (!before(h[c]!, last)) break
      h[i] = h[c]!
      i = c
    }
    h[i] = last
    return top
  }
}

function before (a: Event, b: Event): boolean {
  return a.t < b.t || (a.t === b.t && a.seq < b.seq)
}

export class Simulator {
  /** Simulated milliseconds since the start. */
  now = 0
  /** Events processed, for the performance report. */
  events = 0
  private readonly queue = new EventQueue()
  private woken = false
  private stopped = false

  /** Runs FN at simulated time T (never in the past); async code it starts runs before the clock moves on. */
  at (t: number, fn: () => void): void {
    this.queue.push(Math.max(t, this.now), fn)
  }

  /** Like `at`, for callbacks that touch no promise unless they call wake() (the hot path: link pieces). */
  atQuiet (t: number, fn: () => void): void {
    this.queue.push(Math.max(t, this.now), fn, true)
  }

  /** Marks that the current (quiet) event settled a promise: its continuations run before the clock moves. */
  wake (): void {
    this.woken = true
  }

  /** Resolves after MS simulated milliseconds; rejects with the signal's reason if it aborts first. */
  sleep (ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted === true) return Promise.reject(signal.reason)
    return new Promise<void>((resolve, reject) => {
      let done = false
      const onAbort = (): void => {
        if (done) return
        done = true
        reject(signal!.reason)
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      // A positive sleep moves the clock, as a real timer does: now + ms rounds back to now when
      // ms is below now's float precision (a waiter's "time left" can be 1e-12 ms).
      const t = ms > 0 ? this.now + Math.max(ms, this.now * 2 * Number.EPSILON) : this.now + ms
      // Quiet: a sleep its signal cut short leaves a no-op behind, which costs no yield to promises.
      this.atQuiet(t, () => {
        if (done) return
        done = true
        signal?.removeEventListener('abort', onAbort)
        this.wake()
        resolve()
      })
    })
  }

  /** A signal that aborts MS simulated milliseconds from now (AbortSignal.timeout in simulated time). */
  timeout (ms: number): AbortSignal {
    return this.deadline(ms).signal
  }

  /**
   * Like `timeout`, with `cancel()` for a deadline whose work is done: a deadline that
   * fires late still aborts every signal derived from it (AbortSignal.any), and a
   * 3 GB read leaves millions of them behind.
   */
  deadline (ms: number): { signal: AbortSignal, cancel: () => void } {
    const controller = new AbortController()
    let cancelled = false
    // Quiet unless it fires: most deadlines are never reached (the answer came first).
    this.atQuiet(this.now + ms, () => {
      if (cancelled || controller.signal.aborted) return
      this.wake()
      controller.abort(timeoutError(ms))
    })
    return { signal: controller.signal, cancel: () => { cancelled = true } }
  }

  /** Processes events until none are left, `until` passes, or stop() is called. */
  async run (until = Infinity): Promise<void> {
    for (;;) {
      if (this.stopped) return
      const e = this.queue.pop()
      if (e === undefined) return
      if (e.t > until) {
        this.now = until
        return
      }
      this.now = e.t
      this.events++
      e.fn()
      if (!e.quiet || this.woken) {
        this.woken = false
        await new Promise<void>(resolve => setImmediate(resolve))
      }
    }
  }

  stop (): void {
    this.stopped = true
  }
}

export class TimeoutError extends Error {
  constructor (ms: number) {
    super(`timed out after ${ms} simulated ms`)
    this.name = 'TimeoutError'
  }
}

/** One error per duration: building one (a stack trace) for each of millions of deadlines showed in profiles. */
const timeoutErrors = new Map<number, TimeoutError>()
function timeoutError (ms: number): TimeoutError {
  let err = timeoutErrors.get(ms)
  if (err === undefined) timeoutErrors.set(ms, err = new TimeoutError(ms))
  return err
}

/** A promise with its resolve and reject exposed; settling it wakes the simulator. */
export function deferred<T> (sim: Simulator): { promise: Promise<T>, resolve: (value: T) => void, reject: (err: unknown) => void } {
  let resolve!: (value: T) => void
  let reject!: (err: unknown) => void
  const promise = new Promise<T>((res, rej) => {
    resolve = value => { sim.wake(); res(value) }
    reject = err => { sim.wake(); rej(err) }
  })
  return { promise, resolve, reject }
}
