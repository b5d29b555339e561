import { sleep } from './limit.ts'

/**
 * Time as the read path's policy code sees it (resolver, HTTP retries, peer source,
 * serving policy). The agent uses the system clock; the simulation model passes its
 * simulated clock, so the model runs the very code the agent runs at 10,000 nodes.
 */
export interface Clock {
  /** Milliseconds since the epoch; the system clock's are monotonic within the process and sub-millisecond (metrics time memory hits). */
  now (): number
  /** Resolves after `ms`; rejects with the signal's reason if it aborts first. */
  sleep (ms: number, signal?: AbortSignal): Promise<void>
  /** A signal that aborts `ms` from now (AbortSignal.timeout). */
  timeout (ms: number): AbortSignal
}

export const systemClock: Clock = {
  now: () => performance.timeOrigin + performance.now(),
  sleep: async (ms, signal) => await sleep(ms, signal),
  timeout: ms => AbortSignal.timeout(ms)
}
