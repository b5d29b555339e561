/**
 * CPU for the model: a processor-sharing server where each of n busy jobs runs
 * at min(1, cores / n) of a core. A real run puts every agent, FUSE and
 * workload on this machine's few cores, so calibrating against it uses one such
 * CPU for all nodes; a modelled cluster gives each node its own single core
 * (the agent is one JavaScript thread), so its verifying and serving compete
 * only with each other.
 */
import { EventQueue, type Simulator } from './des.ts'

export interface Cpu {
  /** Resolves when MS of one core's work is done. */
  work (ms: number): Promise<void>
}

export function makeCpu (sim: Simulator, cores: number): Cpu {
  return new SharedCpu(sim, cores)
}

/**
 * Processor sharing in virtual time: virtual time advances at each job's rate,
 * so a job that needs w finishes when virtual time has grown by w since it
 * arrived, and only the earliest finish needs an event.
 */
class SharedCpu implements Cpu {
  private readonly sim: Simulator
  private readonly cores: number
  /** Jobs by virtual finish time (the queue's "time" is virtual time here). */
  private readonly jobs = new EventQueue()
  private active = 0
  private virtual = 0
  private lastUpdate = 0
  /** Bumped on every change: a scheduled completion of an older generation is stale. */
  private generation = 0

  constructor (sim: Simulator, cores: number) {
    this.sim = sim
    this.cores = cores
  }

  work (ms: number): Promise<void> {
    if (ms <= 0) return Promise.resolve()
    this.advance()
    return new Promise<void>(resolve => {
      this.jobs.push(this.virtual + ms, resolve)
      this.active++
      this.schedule()
    })
  }

  private rate (): number {
    return Math.min(1, this.cores / Math.max(1, this.active))
  }

  private advance (): void {
    this.virtual += (this.sim.now - this.lastUpdate) * this.rate()
    this.lastUpdate = this.sim.now
  }

  private schedule (): void {
    const generation = ++this.generation
    const next = this.jobs.peekTime()
    if (next === undefined) return
    this.sim.at(this.sim.now + Math.max(0, next - this.virtual) / this.rate(), () => {
      if (generation !== this.generation) return
      this.advance()
      // Finish everything due (float slack: a hair early counts as done).
      while ((this.jobs.peekTime() ?? Infinity) <= this.virtual + 1e-9) {
        this.jobs.pop()!.fn()
        this.active--
      }
      this.schedule()
    })
  }
}
