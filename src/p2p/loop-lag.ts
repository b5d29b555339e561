import { monitorEventLoopDelay } from 'node:perf_hooks'

type IntervalHistogram = ReturnType<typeof monitorEventLoopDelay>

export interface LoopLagSummary {
  /** Delays seen since start, in ms. */
  p50Ms: number
  p99Ms: number
  maxMs: number
}

/**
 * How late this process's event loop runs: the worst delay of the last full
 * window and of the one running. A node starved of CPU (twenty agents on two
 * cores) reads a peer's answer late, and its peers, as starved, send it late;
 * a fixed 500 ms deadline then times out healthy peers, which become suspects,
 * and the chunk goes to the origin. Peer deadlines allow for this delay.
 */
export class EventLoopLag {
  private readonly window: IntervalHistogram
  private readonly lifetime: IntervalHistogram
  private readonly timer: NodeJS.Timeout
  private readonly resolutionMs: number
  private lastWindowMs = 0

  constructor (options: { windowMs?: number, resolutionMs?: number } = {}) {
    const resolution = this.resolutionMs = options.resolutionMs ?? 10
    this.window = monitorEventLoopDelay({ resolution })
    this.lifetime = monitorEventLoopDelay({ resolution })
    this.window.enable()
    this.lifetime.enable()
    this.timer = setInterval(() => {
      this.lastWindowMs = this.ms(this.window.max)
      this.window.reset()
    }, options.windowMs ?? 1000)
    this.timer.unref()
  }

  /** The recent delay in ms (0 when the loop keeps up). */
  recentMs (): number {
    return Math.max(this.lastWindowMs, this.ms(this.window.max))
  }

  summary (): LoopLagSummary {
    return { p50Ms: this.ms(this.lifetime.percentile(50)), p99Ms: this.ms(this.lifetime.percentile(99)), maxMs: this.ms(this.lifetime.max) }
  }

  close (): void {
    clearInterval(this.timer)
    this.window.disable()
    this.lifetime.disable()
  }

  /** The histogram records whole sampling intervals (so the resolution itself); an empty one reports a huge value. */
  private ms (ns: number): number {
    if (!Number.isFinite(ns) || ns > 3.6e12) return 0
    return Math.max(0, Math.round(ns / 1e6 - this.resolutionMs))
  }
}
