import type { Logger } from 'pino'
import { FormatError, NotFoundError, ShoalError, SignatureError, UsageError } from '../errors.ts'
import { imageName } from '../format/signing.ts'
import { oneLine } from '../util/error-line.ts'
import { platformTag } from './rules.ts'
import type { Converter, ExtraName, Job, JobQueue } from './types.ts'

export interface WorkerOptions {
  queue: JobQueue
  converter: Converter
  log: Logger
  concurrency: number
  maxAttempts: number
  retryBaseMs: number
  retryMaxMs: number
  pollMs: number
  progressWriteMs: number
  /** Told when a job ends (for metrics). */
  onFinished?: (job: Job, outcome: { state: 'done' | 'failed' | 'skipped', seconds: number, bytesIn: number, bytesOut: number }) => void
  now?: () => number
}

/**
 * Runs queued jobs, at most `concurrency` at once. A job that fails is tried again
 * after a doubling backoff, and ends as failed with its reason after maxAttempts
 * tries, or at once when retrying cannot help (the source is malformed or gone, a
 * usage or signing-key problem). stop() aborts the running conversions and puts
 * their jobs back in the queue: the next start resumes them.
 */
export class Worker {
  /** Running conversions (`job:ID`) and name additions (`name:ID:TAG`). */
  private readonly running = new Map<string, { promise: Promise<void>, abort: AbortController }>()
  private readonly stopping = new AbortController()
  private timer: NodeJS.Timeout | undefined
  private readonly now: () => number
  private readonly options: WorkerOptions

  constructor (options: WorkerOptions) {
    this.options = options
    this.now = options.now ?? Date.now
  }

  start (): void {
    const resumed = this.options.queue.recoverInterrupted()
    if (resumed > 0) this.options.log.info({ jobs: resumed }, 'resuming jobs a previous run left unfinished')
    this.wake()
  }

  /** Looks for due jobs now (an event queued one). */
  wake (): void {
    if (this.stopping.signal.aborted) return
    clearTimeout(this.timer)
    while (this.running.size < this.options.concurrency) {
      const job = this.options.queue.claim(this.now())
      if (job !== undefined) { this.run(`job:${job.id}`, signal => this.work(job, signal)); continue }
      const next = this.options.queue.claimName()
      if (next === undefined) break
      this.run(`name:${next.job.id}:${next.name.tag}`, signal => this.addName(next.job, next.name, signal))
    }
    // At capacity, the next end wakes us: due jobs must not make this spin.
    const due = this.running.size < this.options.concurrency ? this.options.queue.nextDue() : undefined
    const wait = due === undefined ? this.options.pollMs : Math.max(0, Math.min(this.options.pollMs, due - this.now()))
    this.timer = setTimeout(() => this.wake(), wait)
    this.timer.unref()
  }

  /** Aborts running conversions (their jobs go back to the queue) and waits for them to let go. */
  async stop (): Promise<void> {
    this.stopping.abort()
    clearTimeout(this.timer)
    for (const { abort } of this.running.values()) abort.abort(new Error('convertd is stopping'))
    await Promise.all([...this.running.values()].map(r => r.promise))
  }

  private run (key: string, task: (signal: AbortSignal) => Promise<void>): void {
    const abort = new AbortController()
    const promise = task(abort.signal).finally(() => {
      this.running.delete(key)
      this.wake()
    })
    this.running.set(key, { promise, abort })
  }

  /**
   * Another tag for a digest already converted: the conversion is signed again for
   * every name it has had (so agents accept it under the new one as under the old),
   * then the new destination tag points at it. An index passes the name on to its
   * platforms' jobs; a skipped job (nothing converted here) has nothing to sign.
   */
  private async addName (job: Job, name: ExtraName, signal: AbortSignal): Promise<void> {
    const { queue, log } = this.options
    const what = { job: job.id, image: `${job.registry}/${job.repository}:${name.tag}`, digest: job.digest }
    try {
      if (job.state === 'skipped') {
        queue.finishName(job.id, name.tag, 'skipped', `the job was skipped: ${job.reason ?? ''}`)
      } else if (job.result === undefined) {
        const children = queue.children(job.id)
        for (const child of children) queue.addName(child.id, name.tag, platformTag(name.destTag, child.platform!))
        queue.finishName(job.id, name.tag, 'done', `passed on to ${children.length} platform jobs`)
      } else {
        const tags = [{ tag: job.tag, destTag: job.destTag }, ...queue.names(job.id).filter(n => n.state === 'done' || n.tag === name.tag)]
        const names = [...new Set(tags.flatMap(t => [imageName(job.repository, t.tag, job.registry), imageName(job.destRepository, t.destTag, job.registry)]))]
        await this.options.converter.addName({ ...job, result: job.result }, name.destTag, names, { signal })
        queue.finishName(job.id, name.tag, 'done')
        log.info({ ...what, dest: `${job.registry}/${job.destRepository}:${name.destTag}`, names }, 'signed the conversion for another tag of the same image')
      }
    } catch (err) {
      if (signal.aborted) { queue.finishName(job.id, name.tag, 'pending'); return }
      queue.finishName(job.id, name.tag, 'failed', reasonOf(err))
      log.error({ ...what, reason: reasonOf(err) }, 'could not add the name to the conversion')
    }
  }

  private async work (job: Job, signal: AbortSignal): Promise<void> {
    const { queue, log, converter } = this.options
    const what = { job: job.id, image: `${job.registry}/${job.repository}:${job.tag}`, digest: job.digest, attempt: job.attempts }
    if (job.attempts > this.options.maxAttempts) {
      const reason = `interrupted ${job.attempts - 1} times: the service was killed or crashed while converting it; look at its logs and memory limit, then queue it again (shoal convertd sync)`
      queue.fail(job.id, reason, undefined)
      log.error({ ...what, reason }, 'conversion failed')
      this.options.onFinished?.(job, { state: 'failed', seconds: 0, bytesIn: 0, bytesOut: 0 })
      return
    }
    log.info(what, 'converting')
    const started = this.now()
    let lastWrite = 0
    const onProgress = (bytesIn: number, bytesTotal: number): void => {
      if (this.now() - lastWrite < this.options.progressWriteMs) return
      lastWrite = this.now()
      queue.progress(job.id, bytesIn, bytesTotal)
    }
    try {
      const outcome = await converter.convert(job, { signal, onProgress })
      const seconds = (this.now() - started) / 1000
      if (outcome.kind === 'index') {
        for (const p of outcome.platforms) {
          const { job: child, created } = queue.enqueue({ ...job, digest: p.digest, destTag: platformTag(job.destTag, p.platform), platform: p.platform }, `index:${job.id}`)
          log.info({ ...what, platform: p.platform, child: child.id, created }, 'queued a platform of a multi-platform image')
        }
        queue.finish(job.id, { state: 'done', reason: `a multi-platform index: ${outcome.platforms.length} platform jobs`, bytesIn: 0, bytesOut: 0, seconds })
        this.options.onFinished?.(job, { state: 'done', seconds, bytesIn: 0, bytesOut: 0 })
      } else if (outcome.kind === 'skipped') {
        queue.finish(job.id, { state: 'skipped', reason: outcome.reason, bytesIn: 0, bytesOut: 0, seconds })
        log.info({ ...what, reason: outcome.reason }, 'nothing to convert')
        this.options.onFinished?.(job, { state: 'skipped', seconds, bytesIn: 0, bytesOut: 0 })
      } else {
        queue.finish(job.id, { state: 'done', result: outcome.result, ...(outcome.note !== undefined ? { reason: outcome.note } : {}), bytesIn: outcome.bytesIn, bytesOut: outcome.bytesOut, seconds })
        log.info({ ...what, result: outcome.result, dest: `${job.registry}/${job.destRepository}:${job.destTag}`, seconds, bytesIn: outcome.bytesIn, bytesOut: outcome.bytesOut, ...(outcome.note !== undefined ? { note: outcome.note } : {}) }, 'converted')
        this.options.onFinished?.(job, { state: 'done', seconds, bytesIn: outcome.bytesIn, bytesOut: outcome.bytesOut })
      }
    } catch (err) {
      if (signal.aborted) {
        queue.requeue(job.id)
        log.info(what, 'conversion interrupted by the stop; the next start resumes it')
        return
      }
      const reason = reasonOf(err)
      const final = !retryable(err) || job.attempts >= this.options.maxAttempts
      const retryAt = final ? undefined : this.now() + Math.min(this.options.retryMaxMs, this.options.retryBaseMs * 2 ** (job.attempts - 1))
      queue.fail(job.id, reason, retryAt)
      if (final) {
        log.error({ ...what, reason }, 'conversion failed')
        this.options.onFinished?.(job, { state: 'failed', seconds: (this.now() - started) / 1000, bytesIn: 0, bytesOut: 0 })
      } else {
        log.warn({ ...what, reason, retryAt: new Date(retryAt!).toISOString() }, 'conversion failed; retrying later')
      }
    }
  }
}

/** Whether another try may succeed: not for a malformed or vanished source, bad input or a bad key. */
function retryable (err: unknown): boolean {
  return !(err instanceof UsageError || err instanceof FormatError || err instanceof NotFoundError || err instanceof SignatureError)
}

/** ERR as a job's failure reason: one line, with the error's class when it is not one of shoal's. */
function reasonOf (err: unknown): string {
  const text = oneLine(err instanceof Error ? err.message : String(err))
  return err instanceof ShoalError || !(err instanceof Error) ? text : `${text} (${err.name})`
}
