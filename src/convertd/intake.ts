import type { Digest } from '../oci/digest.ts'
import type { JobQueue, RuleSet } from './types.ts'

export type IntakeOutcome = 'queued' | 'new-name' | 'duplicate' | 'ignored'

/**
 * What convertd does with a manifest pushed under REPO:TAG (from an event, or found
 * by sync): the rules decide, and the queue keeps one job per digest, so the same
 * push seen twice is a duplicate, and the same image under another tag only adds
 * that name (signed for, and tagged) to the one conversion.
 */
export function queuePush (queue: JobQueue, rules: RuleSet, push: { registry: string, repository: string, tag: string, digest: Digest }, origin: string): { outcome: IntakeOutcome, why?: string, jobId?: number } {
  const decision = rules.decide(push.repository, push.tag)
  if (!decision.convert) return { outcome: 'ignored', why: decision.why }
  const { job, created } = queue.enqueue({
    registry: push.registry,
    repository: push.repository,
    tag: push.tag,
    digest: push.digest,
    destRepository: decision.destRepository,
    destTag: decision.destTag,
    key: decision.key,
    ...(decision.lifetimeMs !== undefined ? { lifetimeMs: decision.lifetimeMs } : {})
  }, origin)
  if (created) return { outcome: 'queued', jobId: job.id }
  if (job.tag !== push.tag && queue.addName(job.id, push.tag, decision.destTag)) return { outcome: 'new-name', jobId: job.id }
  return { outcome: 'duplicate', jobId: job.id }
}
