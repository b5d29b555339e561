import type { Digest } from '../oci/digest.ts'
import type { Platform } from '../convert/source-image.ts'

/**
 * The interfaces of convertd's parts (implementations: queue.ts, rules.ts,
 * registry-converter.ts), so the service and the tests can swap them.
 */

export type JobState = 'queued' | 'running' | 'done' | 'failed' | 'skipped'
export const JOB_STATES: readonly JobState[] = ['queued', 'running', 'done', 'failed', 'skipped']

/** What a job converts and where the result goes, fixed when it is queued. */
export interface JobPlan {
  /** HOST[:PORT] of the registry, as convertd reaches it. */
  registry: string
  repository: string
  /** The tag the source was pushed under: what the signature names and the destination tag is made from. */
  tag: string
  /** The source manifest (or index) digest: a job per (registry, repository, digest), ever. */
  digest: Digest
  destRepository: string
  destTag: string
  /** The signing key file. */
  key: string
  /** Signature lifetime in ms, null = never; absent = shoal's default. */
  lifetimeMs?: number | null
  /** For a platform manifest of an index: its platform (the index's job queued it). */
  platform?: Platform
}

export interface Job extends JobPlan {
  id: number
  state: JobState
  attempts: number
  /** Epoch ms. */
  createdAt: number
  startedAt?: number
  finishedAt?: number
  /** When a queued job may run (retries wait here). */
  notBefore: number
  /** Why it failed (the last error), was skipped, or is being retried. */
  reason?: string
  /** The shoal image's manifest digest, once done. */
  result?: Digest
  /** Compressed source layer bytes read so far / in total. */
  bytesIn: number
  bytesTotal: number
  /** Bytes uploaded to the registry. */
  bytesOut: number
  seconds?: number
  /** Where it came from: 'event', 'sync', or the index job that queued it ('index:ID'). */
  origin: string
}

/**
 * Another tag pushed for a digest that already has a job: not converted again, but
 * the conversion is re-signed to name REPO:TAG too (agents check the pod's image
 * name) and gets its own destination tag.
 */
export interface ExtraName {
  jobId: number
  tag: string
  destTag: string
  state: 'pending' | 'running' | 'done' | 'failed' | 'skipped'
  reason?: string
  createdAt: number
  finishedAt?: number
}

export interface JobCounts { queued: number, running: number, done: number, failed: number, skipped: number }

/** The durable queue: one job per source manifest digest, ever. */
export interface JobQueue {
  /** Queues a job unless one exists for (registry, repository, digest); returns it and whether it is new. */
  enqueue: (plan: JobPlan, origin: string) => { job: Job, created: boolean }
  /** Records another tag for a job's digest (once per tag; a failed one is pending again); true when there is work. */
  addName: (jobId: number, tag: string, destTag: string) => boolean
  /** The next pending name whose job has ended (converted or skipped), marked running. */
  claimName: () => { name: ExtraName, job: Job } | undefined
  /** 'pending' puts it back (an interrupted stop). */
  finishName: (jobId: number, tag: string, state: 'done' | 'failed' | 'skipped' | 'pending', reason?: string) => void
  names: (jobId: number) => ExtraName[]
  /** The platform jobs an index's job queued. */
  children: (jobId: number) => Job[]
  /** Marks the next due queued job running and returns it, or undefined. */
  claim: (now: number) => Job | undefined
  /** The earliest notBefore of queued jobs (for the next wake-up), or undefined. */
  nextDue: () => number | undefined
  progress: (id: number, bytesIn: number, bytesTotal: number) => void
  finish: (id: number, outcome: { state: 'done' | 'skipped', result?: Digest, reason?: string, bytesIn: number, bytesOut: number, seconds: number }) => void
  /** A failed try: back to queued at notBefore, or failed for good (notBefore undefined). */
  fail: (id: number, reason: string, notBefore: number | undefined) => void
  /** A try that was interrupted (shutdown, crash): queued again at once, the try not counted. */
  requeue: (id: number) => void
  /** Jobs a killed process left running: queued again, the try counted; returns how many. */
  recoverInterrupted: () => number
  find: (registry: string, repository: string, digest: Digest) => Job | undefined
  counts: () => JobCounts
  /** The most recent jobs, newest first; with `states`, only those. */
  list: (options?: { limit?: number, states?: readonly JobState[] }) => Job[]
  close: () => void
}

/** What the rules decide for REPO:TAG: not converted, or how. */
export type RuleDecision =
  | { convert: false, why: string }
  | { convert: true, destRepository: string, destTag: string, key: string, lifetimeMs?: number | null }

export interface RuleSet {
  decide: (repository: string, tag: string) => RuleDecision
}

/** One converted platform manifest, or what an index holds, or why nothing was done. */
export type ConversionOutcome =
  | { kind: 'converted', result: Digest, bytesIn: number, bytesOut: number, note?: string }
  | { kind: 'index', platforms: Array<{ digest: Digest, platform: Platform }> }
  | { kind: 'skipped', reason: string }

/** Does one job's work against the registry. */
export interface Converter {
  convert: (job: Job, options: { signal: AbortSignal, onProgress: (bytesIn: number, bytesTotal: number) => void }) => Promise<ConversionOutcome>
  /** Re-signs a job's conversion for NAMES (REPO:TAG) and points DESTTAG at it. */
  addName: (job: Job & { result: Digest }, destTag: string, names: string[], options: { signal: AbortSignal }) => Promise<void>
}
