import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import type { Digest } from '../oci/digest.ts'
import type { Platform } from '../convert/source-image.ts'
import { QUEUE_FILE } from './constants.ts'
import { JOB_STATES, type ExtraName, type Job, type JobCounts, type JobPlan, type JobQueue, type JobState } from './types.ts'

/**
 * The durable job queue: one SQLite file in the state directory, WAL mode (so
 * `shoal convertd status` and `sync` read and write beside the running service),
 * every change one transaction. The UNIQUE (registry, repository, digest) key is
 * what makes a conversion happen once per source manifest digest: a redelivered
 * event, a second push of the same image or a sync finds the row and does nothing.
 */
const SCHEMA = `
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  registry TEXT NOT NULL,
  repository TEXT NOT NULL,
  digest TEXT NOT NULL,
  tag TEXT NOT NULL,
  dest_repository TEXT NOT NULL,
  dest_tag TEXT NOT NULL,
  key TEXT NOT NULL,
  lifetime_ms INTEGER,
  lifetime_set INTEGER NOT NULL DEFAULT 0,
  platform TEXT,
  origin TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  not_before INTEGER NOT NULL,
  reason TEXT,
  result TEXT,
  bytes_in INTEGER NOT NULL DEFAULT 0,
  bytes_total INTEGER NOT NULL DEFAULT 0,
  bytes_out INTEGER NOT NULL DEFAULT 0,
  seconds REAL,
  UNIQUE (registry, repository, digest)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS names (
  job_id INTEGER NOT NULL REFERENCES jobs (id),
  tag TEXT NOT NULL,
  dest_tag TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT,
  created_at INTEGER NOT NULL,
  finished_at INTEGER,
  PRIMARY KEY (job_id, tag)
);
`

interface Row {
  id: number, registry: string, repository: string, digest: string, tag: string, dest_repository: string, dest_tag: string, key: string,
  lifetime_ms: number | null, lifetime_set: number, platform: string | null, origin: string, state: string, attempts: number, created_at: number,
  started_at: number | null, finished_at: number | null, not_before: number, reason: string | null, result: string | null,
  bytes_in: number, bytes_total: number, bytes_out: number, seconds: number | null
}

export class SqliteJobQueue implements JobQueue {
  private readonly db: Database.Database
  private readonly now: () => number

  /** Opens (creating) the queue at PATH; `readonly` for status readers. */
  constructor (path: string, options: { readonly?: boolean, now?: () => number } = {}) {
    this.db = new Database(path, { readonly: options.readonly === true, fileMustExist: options.readonly === true })
    this.now = options.now ?? Date.now
    // Another process (sync, status) may hold the lock for a moment.
    this.db.pragma('busy_timeout = 5000')
    if (options.readonly !== true) {
      this.db.pragma('journal_mode = WAL')
      // A job's row is the service's promise to the registry (it answered 200): it must survive a power cut.
      this.db.pragma('synchronous = FULL')
      this.db.exec(SCHEMA)
    }
  }

  /** The queue of the state directory STATEDIR, created (owner-only: it names the signing keys) if need be. */
  static async openIn (stateDir: string): Promise<SqliteJobQueue> {
    await mkdir(stateDir, { recursive: true, mode: 0o700 })
    return new SqliteJobQueue(join(stateDir, QUEUE_FILE))
  }

  enqueue (plan: JobPlan, origin: string): { job: Job, created: boolean } {
    return this.db.transaction(() => {
      const info = this.db.prepare(`INSERT OR IGNORE INTO jobs (registry, repository, digest, tag, dest_repository, dest_tag, key, lifetime_ms, lifetime_set, platform, origin, state, created_at, not_before)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)`).run(
        plan.registry, plan.repository, plan.digest, plan.tag, plan.destRepository, plan.destTag, plan.key,
        plan.lifetimeMs ?? null, plan.lifetimeMs !== undefined ? 1 : 0, plan.platform !== undefined ? JSON.stringify(plan.platform) : null,
        origin, this.now(), this.now())
      return { job: this.find(plan.registry, plan.repository, plan.digest)!, created: info.changes === 1 }
    })()
  }

  addName (jobId: number, tag: string, destTag: string): boolean {
    // A failed one is tried again when the tag is seen again (a push, a sync).
    return this.db.prepare(`INSERT INTO names (job_id, tag, dest_tag, state, created_at) VALUES (?, ?, ?, 'pending', ?)
      ON CONFLICT (job_id, tag) DO UPDATE SET state = 'pending', reason = NULL WHERE state = 'failed'`).run(jobId, tag, destTag, this.now()).changes === 1
  }

  claimName (): { name: ExtraName, job: Job } | undefined {
    return this.db.transaction(() => {
      // One name at a time per job: each signature names them all, and two at once would each leave the other out.
      const row = this.db.prepare(`SELECT n.* FROM names n JOIN jobs j ON j.id = n.job_id
        WHERE n.state = 'pending' AND j.state IN ('done', 'skipped')
        AND NOT EXISTS (SELECT 1 FROM names r WHERE r.job_id = n.job_id AND r.state = 'running')
        ORDER BY n.created_at, n.rowid LIMIT 1`).get() as NameRow | undefined
      if (row === undefined) return undefined
      this.db.prepare("UPDATE names SET state = 'running' WHERE job_id = ? AND tag = ?").run(row.job_id, row.tag)
      return { name: toName({ ...row, state: 'running' }), job: this.get(row.job_id) }
    }).immediate()
  }

  finishName (jobId: number, tag: string, state: 'done' | 'failed' | 'skipped' | 'pending', reason?: string): void {
    this.db.prepare('UPDATE names SET state = ?, reason = ?, finished_at = ? WHERE job_id = ? AND tag = ?').run(state, reason ?? null, state === 'pending' ? null : this.now(), jobId, tag)
  }

  names (jobId: number): ExtraName[] {
    // rowid: the order they were first seen in, when two came within one millisecond.
    return (this.db.prepare('SELECT * FROM names WHERE job_id = ? ORDER BY created_at, rowid').all(jobId) as NameRow[]).map(toName)
  }

  children (jobId: number): Job[] {
    return (this.db.prepare('SELECT * FROM jobs WHERE origin = ? ORDER BY id').all(`index:${jobId}`) as Row[]).map(toJob)
  }

  claim (now: number): Job | undefined {
    return this.db.transaction(() => {
      const row = this.db.prepare("SELECT * FROM jobs WHERE state = 'queued' AND not_before <= ? ORDER BY not_before, id LIMIT 1").get(now) as Row | undefined
      if (row === undefined) return undefined
      this.db.prepare("UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, reason = NULL WHERE id = ?").run(now, row.id)
      return this.get(row.id)
    }).immediate()
  }

  nextDue (): number | undefined {
    const row = this.db.prepare("SELECT MIN(not_before) AS t FROM jobs WHERE state = 'queued'").get() as { t: number | null }
    return row.t ?? undefined
  }

  progress (id: number, bytesIn: number, bytesTotal: number): void {
    this.db.prepare('UPDATE jobs SET bytes_in = ?, bytes_total = ? WHERE id = ?').run(bytesIn, bytesTotal, id)
  }

  finish (id: number, outcome: { state: 'done' | 'skipped', result?: Digest, reason?: string, bytesIn: number, bytesOut: number, seconds: number }): void {
    this.db.prepare('UPDATE jobs SET state = ?, result = ?, reason = ?, bytes_in = ?, bytes_out = ?, seconds = ?, finished_at = ? WHERE id = ?')
      .run(outcome.state, outcome.result ?? null, outcome.reason ?? null, outcome.bytesIn, outcome.bytesOut, outcome.seconds, this.now(), id)
  }

  fail (id: number, reason: string, notBefore: number | undefined): void {
    if (notBefore === undefined) this.db.prepare("UPDATE jobs SET state = 'failed', reason = ?, finished_at = ? WHERE id = ?").run(reason, this.now(), id)
    else this.db.prepare("UPDATE jobs SET state = 'queued', reason = ?, not_before = ? WHERE id = ?").run(reason, notBefore, id)
  }

  requeue (id: number): void {
    this.db.prepare("UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), not_before = ? WHERE id = ? AND state = 'running'").run(this.now(), id)
  }

  recoverInterrupted (): number {
    this.db.prepare("UPDATE names SET state = 'pending' WHERE state = 'running'").run()
    // The try counts: a job that kills the service every time must end as failed, not loop.
    return this.db.prepare("UPDATE jobs SET state = 'queued', reason = 'interrupted (the service was killed); resumed', not_before = ? WHERE state = 'running'").run(this.now()).changes
  }

  find (registry: string, repository: string, digest: Digest): Job | undefined {
    const row = this.db.prepare('SELECT * FROM jobs WHERE registry = ? AND repository = ? AND digest = ?').get(registry, repository, digest) as Row | undefined
    return row === undefined ? undefined : toJob(row)
  }

  counts (): JobCounts {
    const counts: JobCounts = { queued: 0, running: 0, done: 0, failed: 0, skipped: 0 }
    for (const r of this.db.prepare('SELECT state, COUNT(*) AS n FROM jobs GROUP BY state').all() as Array<{ state: JobState, n: number }>) counts[r.state] = r.n
    return counts
  }

  list (options: { limit?: number, states?: readonly JobState[] } = {}): Job[] {
    const states = options.states ?? JOB_STATES
    const rows = this.db.prepare(`SELECT * FROM jobs WHERE state IN (${states.map(() => '?').join(', ')}) ORDER BY id DESC LIMIT ?`).all(...states, options.limit ?? -1) as Row[]
    return rows.map(toJob)
  }

  close (): void {
    this.db.close()
  }

  private get (id: number): Job {
    return toJob(this.db.prepare('SELECT * FROM jobs WHERE id = ?').get(id) as Row)
  }
}

interface NameRow { job_id: number, tag: string, dest_tag: string, state: string, reason: string | null, created_at: number, finished_at: number | null }

function toName (r: NameRow): ExtraName {
  return {
    jobId: r.job_id,
    tag: r.tag,
    destTag: r.dest_tag,
    state: r.state as ExtraName['state'],
    createdAt: r.created_at,
    ...(r.reason !== null ? { reason: r.reason } : {}),
    ...(r.finished_at !== null ? { finishedAt: r.finished_at } : {})
  }
}

function toJob (r: Row): Job {
  return {
    id: r.id,
    registry: r.registry,
    repository: r.repository,
    digest: r.digest as Digest,
    tag: r.tag,
    destRepository: r.dest_repository,
    destTag: r.dest_tag,
    key: r.key,
    ...(r.lifetime_set === 1 ? { lifetimeMs: r.lifetime_ms } : {}),
    ...(r.platform !== null ? { platform: JSON.parse(r.platform) as Platform } : {}),
    origin: r.origin,
    state: r.state as JobState,
    attempts: r.attempts,
    createdAt: r.created_at,
    ...(r.started_at !== null ? { startedAt: r.started_at } : {}),
    ...(r.finished_at !== null ? { finishedAt: r.finished_at } : {}),
    notBefore: r.not_before,
    ...(r.reason !== null ? { reason: r.reason } : {}),
    ...(r.result !== null ? { result: r.result as Digest } : {}),
    bytesIn: r.bytes_in,
    bytesTotal: r.bytes_total,
    bytesOut: r.bytes_out,
    ...(r.seconds !== null ? { seconds: r.seconds } : {})
  }
}
