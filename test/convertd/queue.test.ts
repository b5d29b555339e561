import assert from 'node:assert/strict'
import { join } from 'node:path'
import { test } from 'node:test'
import pino from 'pino'
import { SqliteJobQueue } from '../../src/convertd/queue.ts'
import type { ConversionOutcome, Converter, Job, JobPlan } from '../../src/convertd/types.ts'
import { Worker } from '../../src/convertd/worker.ts'
import { FormatError, OriginError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { tempDir } from '../helpers/tmp.ts'

const digest = (n: number): Digest => `sha256:${n.toString(16).padStart(64, '0')}`
const plan = (n: number, extra: Partial<JobPlan> = {}): JobPlan => ({ registry: 'reg:5000', repository: 'python', tag: `t${n}`, digest: digest(n), destRepository: 'python', destTag: `t${n}-shoal`, key: '/k', ...extra })
const log = pino({ level: 'silent' })

test('one job per (registry, repository, digest), ever: redelivery and a second push find it', async () => {
  const q = new SqliteJobQueue(join(await tempDir(), 'q.db'))
  const a = q.enqueue(plan(1), 'event')
  assert.equal(a.created, true)
  const b = q.enqueue({ ...plan(1), tag: 'other' }, 'sync')
  assert.equal(b.created, false)
  assert.equal(b.job.id, a.job.id)
  assert.equal(b.job.tag, 't1', 'the first push names the job')
  assert.equal(q.enqueue(plan(1, { repository: 'mirror/python' }), 'event').created, true, 'another repository is another job')
  assert.equal(q.enqueue(plan(2), 'event').created, true, 'a tag pushed again with new content is a new digest')
  assert.deepEqual(q.counts(), { queued: 3, running: 0, done: 0, failed: 0, skipped: 0 })
  q.close()
})

test('claim takes due jobs in order; failures wait; a killed run\'s jobs come back, the try counted; state survives reopening', async () => {
  const file = join(await tempDir(), 'q.db')
  let now = 1000
  const q = new SqliteJobQueue(file, { now: () => now })
  q.enqueue(plan(1, { lifetimeMs: null, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } }), 'event')
  q.enqueue(plan(2), 'event')
  const first = q.claim(now)!
  assert.equal(first.digest, digest(1))
  assert.equal(first.attempts, 1)
  assert.equal(first.lifetimeMs, null, 'a signature that never expires is kept apart from the default')
  assert.deepEqual(first.platform, { os: 'linux', architecture: 'arm64', variant: 'v8' })
  q.fail(first.id, 'registry down', now + 5000)
  assert.equal(q.claim(now)!.digest, digest(2))
  assert.equal(q.claim(now), undefined, 'job 1 is not due yet')
  assert.equal(q.nextDue(), now + 5000)
  now += 5000
  assert.equal(q.claim(now)!.attempts, 2)
  q.close()
  // As after kill -9: both were running.
  const again = new SqliteJobQueue(file, { now: () => now })
  assert.equal(again.recoverInterrupted(), 2)
  const jobs = again.list()
  assert.deepEqual(jobs.map(j => [j.digest, j.state, j.attempts]), [[digest(2), 'queued', 1], [digest(1), 'queued', 2]])
  const j = again.claim(now)!
  again.requeue(j.id)
  assert.equal(again.find('reg:5000', 'python', j.digest)!.attempts, j.attempts - 1, 'a clean stop does not count the try')
  again.close()
})

/** A converter that answers from a script, per digest. */
function scripted (script: (job: Job, signal: AbortSignal) => Promise<ConversionOutcome>): Converter & { calls: Job[] } {
  const calls: Job[] = []
  return {
    calls,
    convert: async (job, { signal }) => { calls.push(job); signal.throwIfAborted(); return await script(job, signal) },
    addName: async () => { throw new Error('not used here') }
  }
}

async function settle (q: SqliteJobQueue, done: (q: SqliteJobQueue) => boolean): Promise<void> {
  const deadline = Date.now() + 5000
  while (!done(q)) {
    if (Date.now() > deadline) throw new Error(`jobs did not settle: ${JSON.stringify(q.list().map(j => [j.id, j.state, j.attempts, j.reason]))}`)
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}

test('worker: retries with backoff then failed with the reason; not retried when it cannot help; bounded concurrency', async () => {
  const q = new SqliteJobQueue(join(await tempDir(), 'q.db'))
  let running = 0
  let peak = 0
  const converter = scripted(async (job) => {
    running++
    peak = Math.max(peak, running)
    await new Promise(resolve => setTimeout(resolve, 20))
    running--
    if (job.digest === digest(1)) throw new OriginError('registry answered 503', { status: 503, retryable: true })
    if (job.digest === digest(2)) throw new FormatError('layer 0 is truncated; the source image is damaged')
    return { kind: 'converted', result: digest(100 + job.id), bytesIn: 10, bytesOut: 5 }
  })
  const finished: string[] = []
  const worker = new Worker({ queue: q, converter, log, concurrency: 2, maxAttempts: 3, retryBaseMs: 10, retryMaxMs: 1000, pollMs: 20, progressWriteMs: 0, onFinished: (j, o) => finished.push(`${j.id}:${o.state}`) })
  for (let i = 1; i <= 6; i++) q.enqueue(plan(i), 'event')
  worker.start()
  await settle(q, q => q.counts().queued + q.counts().running === 0)
  await worker.stop()
  const byDigest = new Map(q.list().map(j => [j.digest, j]))
  assert.equal(byDigest.get(digest(1))!.state, 'failed')
  assert.equal(byDigest.get(digest(1))!.attempts, 3)
  assert.equal(byDigest.get(digest(1))!.reason, 'registry answered 503')
  assert.equal(byDigest.get(digest(2))!.state, 'failed')
  assert.equal(byDigest.get(digest(2))!.attempts, 1, 'a damaged source is not retried')
  for (let i = 3; i <= 6; i++) assert.equal(byDigest.get(digest(i))!.state, 'done')
  assert.equal(peak, 2)
  assert.equal(finished.length, 6)
  q.close()
})

test('worker: an index queues one job per platform, tagged apart; stop() puts a running job back', async () => {
  const q = new SqliteJobQueue(join(await tempDir(), 'q.db'))
  // Stands for a conversion under way: it ends only when aborted, as convertImage does.
  const converter = scripted(async (job, signal) => {
    if (job.digest === digest(1)) return { kind: 'index', platforms: [{ digest: digest(11), platform: { os: 'linux', architecture: 'amd64' } }, { digest: digest(12), platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } }] }
    if (job.digest === digest(12)) await new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error)))
    return { kind: 'converted', result: digest(99), bytesIn: 1, bytesOut: 1 }
  })
  const worker = new Worker({ queue: q, converter, log, concurrency: 2, maxAttempts: 3, retryBaseMs: 10, retryMaxMs: 1000, pollMs: 20, progressWriteMs: 0 })
  q.enqueue(plan(1, { tag: '3', destTag: '3-shoal' }), 'event')
  worker.start()
  await settle(q, q => q.find('reg:5000', 'python', digest(11))?.state === 'done' && q.find('reg:5000', 'python', digest(12))?.state === 'running')
  const amd = q.find('reg:5000', 'python', digest(11))!
  assert.equal(amd.destTag, '3-shoal-linux-amd64')
  assert.equal(amd.tag, '3')
  assert.equal(amd.origin, `index:${q.find('reg:5000', 'python', digest(1))!.id}`)
  assert.equal(q.find('reg:5000', 'python', digest(12))!.destTag, '3-shoal-linux-arm64-v8')
  assert.equal(q.find('reg:5000', 'python', digest(1))!.state, 'done')
  await worker.stop()
  const arm = q.find('reg:5000', 'python', digest(12))!
  assert.equal(arm.state, 'queued')
  assert.equal(arm.attempts, 0)
  q.close()
})

test('worker: another tag of a converted digest is signed for (every name so far) and tagged, once; an index passes it to its platforms', async () => {
  // A coarse clock: names seen within one tick are still signed for in the order they came.
  const q = new SqliteJobQueue(join(await tempDir(), 'q.db'), { now: () => Math.floor(Date.now() / 5000) * 5000 })
  const signed: Array<{ job: number, destTag: string, names: string[] }> = []
  const converter: Converter = {
    convert: async (job) => job.digest === digest(2)
      ? { kind: 'index', platforms: [{ digest: digest(21), platform: { os: 'linux', architecture: 'amd64' } }] }
      : { kind: 'converted', result: digest(100 + job.id), bytesIn: 1, bytesOut: 1 },
    addName: async (job, destTag, names) => { signed.push({ job: job.id, destTag, names }) }
  }
  const worker = new Worker({ queue: q, converter, log, concurrency: 2, maxAttempts: 3, retryBaseMs: 10, retryMaxMs: 1000, pollMs: 20, progressWriteMs: 0 })
  const one = q.enqueue(plan(1, { tag: '3', destTag: '3-shoal' }), 'event').job
  // Pushed again under other tags before the conversion ran: recorded, signed once it is done.
  assert.equal(q.addName(one.id, 'latest', 'latest-shoal'), true)
  assert.equal(q.addName(one.id, 'latest', 'latest-shoal'), false, 'once per tag')
  q.finishName(one.id, 'latest', 'failed', 'registry down')
  assert.equal(q.addName(one.id, 'latest', 'latest-shoal'), true, 'a failed one is tried again when the tag is seen again')
  assert.equal(q.addName(one.id, '3.12', '3.12-shoal'), true)
  const index = q.enqueue(plan(2, { tag: 'v1', destTag: 'v1-shoal' }), 'event').job
  q.addName(index.id, 'stable', 'stable-shoal')
  worker.start()
  await settle(q, q => q.names(one.id).every(n => n.state === 'done') && q.names(index.id).every(n => n.state === 'done') && q.list().every(j => j.state === 'done') &&
    q.children(index.id).every(c => q.names(c.id).length === 1 && q.names(c.id).every(n => n.state === 'done')))
  await worker.stop()
  const forOne = signed.filter(s => s.job === one.id)
  assert.deepEqual(forOne.map(s => s.destTag), ['latest-shoal', '3.12-shoal'])
  assert.deepEqual(forOne[0]!.names, ['python:3', 'python:3-shoal', 'python:latest', 'python:latest-shoal'])
  assert.deepEqual(forOne[1]!.names, ['python:3', 'python:3-shoal', 'python:latest', 'python:latest-shoal', 'python:3.12', 'python:3.12-shoal'], 'every name so far: a signature replaces the one before')
  const child = q.children(index.id)[0]!
  assert.deepEqual(signed.filter(s => s.job === child.id).map(s => [s.destTag, s.names]), [['stable-shoal-linux-amd64', ['python:v1', 'python:v1-shoal-linux-amd64', 'python:stable', 'python:stable-shoal-linux-amd64']]])
  q.close()
})

test('worker: due jobs waiting for a free slot do not make it spin', async () => {
  const q = new SqliteJobQueue(join(await tempDir(), 'q.db'))
  const converter = scripted(async job => {
    await new Promise(resolve => setTimeout(resolve, 150))
    return { kind: 'converted', result: digest(100 + job.id), bytesIn: 1, bytesOut: 1 }
  })
  // Each wake-up asks for the next due time: count them.
  let wakeups = 0
  const nextDue = q.nextDue.bind(q)
  q.nextDue = () => { wakeups++; return nextDue() }
  const worker = new Worker({ queue: q, converter, log, concurrency: 1, maxAttempts: 3, retryBaseMs: 10, retryMaxMs: 1000, pollMs: 1000, progressWriteMs: 0 })
  for (let i = 1; i <= 3; i++) q.enqueue(plan(i), 'event')
  worker.start()
  await settle(q, q => q.counts().done === 3)
  await worker.stop()
  assert.ok(wakeups < 20, `${wakeups} wake-ups in about 450 ms`)
  q.close()
})
