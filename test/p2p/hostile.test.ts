/**
 * Hostile peers (issue 15, items 1, 2, 3 and 7): an attacker process of real
 * libp2p nodes on 127.0.0.1 speaks shoal's chunk protocol (raw frames from the
 * protocol's own encoders) to a victim process running the agent's peer layer
 * (fixtures/victim-process.ts). The parent watches the victim from outside:
 * reads of a cached chunk through its resolver every 50 ms (like FUSE reads,
 * timed from when they were asked), its event-loop delay, and its RSS and CPU
 * from /proc.
 *
 * Each attack sends the volumes (the WANT/CANCEL churn: as many as it can); what each one did before the fix is in
 * the test's comment.
 */
import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { setPriority } from 'node:os'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { after, test, type TestContext } from 'node:test'
import type { Digest } from '../../src/oci/digest.ts'
import { CHUNK_SERVER_DEFAULTS } from '../../src/p2p/chunk-server.ts'
import { FOREIGN_SWARM_LIMITS } from '../../src/p2p/swarm-members.ts'
import { sleep } from '../../src/util/limit.ts'
import { tempDir } from '../helpers/tmp.ts'

const VICTIM = new URL('./fixtures/victim-process.ts', import.meta.url).pathname
const ATTACKER = new URL('./fixtures/attacker-process.ts', import.meta.url).pathname
const CLOCK_TICKS = 100

/** The bars: loop delay at p99, and the slowest concurrent read. */
const MAX_LAG_P99_MS = 100
const MAX_READ_MS = 200
/** How long a flood is watched (the old code took 20-45 s to work through the floods below). */
const ATTACK_MS = 20_000

interface Chunk { digest: Digest, length: number }
interface Ready { peerId: string, multiaddrs: string[], packs: Digest[], small: Chunk[], big: Chunk[] }
interface VictimStats {
  lag: { p50: number, p99: number, max: number }
  server: Record<string, number>
  keys: number
  /** process.memoryUsage() */
  rss: number
  heapUsed: number
  heapTotal: number
  external: number
  arrayBuffers: number
}

/** A child process speaking JSON lines; killed when the file's tests end. */
class Child {
  readonly child: ChildProcess
  private readonly listeners = new Set<(message: Record<string, unknown>) => void>()
  private readonly exited: Promise<void>

  constructor (script: string, arg: unknown, execArgv: string[] = []) {
    this.child = spawn(process.execPath, [...execArgv, script, typeof arg === 'string' ? arg : JSON.stringify(arg)], { stdio: ['pipe', 'pipe', 'inherit'] })
    after(() => { this.child.kill('SIGKILL') })
    this.exited = new Promise(resolve => this.child.once('exit', () => resolve()))
    createInterface({ input: this.child.stdout! }).on('line', line => {
      let message: Record<string, unknown>
      try { message = JSON.parse(line) as Record<string, unknown> } catch { return }
      for (const listener of this.listeners) listener(message)
    })
  }

  /** The next message `match` accepts, or undefined after `ms`. */
  async next<T> (match: (message: Record<string, unknown>) => T | undefined, ms: number): Promise<T | undefined> {
    return await new Promise<T | undefined>(resolve => {
      const listener = (message: Record<string, unknown>): void => {
        const value = match(message)
        if (value === undefined) return
        clearTimeout(timer)
        this.listeners.delete(listener)
        resolve(value)
      }
      const timer = setTimeout(() => { this.listeners.delete(listener); resolve(undefined) }, ms)
      this.listeners.add(listener)
    })
  }

  on (listener: (message: Record<string, unknown>) => void): void { this.listeners.add(listener) }

  write (line: string): void { this.child.stdin!.write(line + '\n') }

  async kill (): Promise<void> {
    this.child.kill('SIGKILL')
    await this.exited
  }
}

class Victim extends Child {
  ready!: Ready
  private n = 0

  static async start (spec: { packs: number, chunks: number, size: number, big: number }): Promise<Victim> {
    const victim = new Victim(VICTIM, { ...spec, stateDir: await tempDir('shoal-victim-') }, ['--expose-gc'])
    const ready = await victim.next(m => m.peerId !== undefined ? m as unknown as Ready : undefined, 60_000)
    assert.ok(ready !== undefined, 'the victim started')
    victim.ready = ready
    return victim
  }

  get target (): string { return this.ready.multiaddrs[0]! }

  /** Its own report, or undefined if it cannot answer within `ms` (its event loop is stuck). */
  async stats (ms = 10_000): Promise<VictimStats | undefined> {
    const id = ++this.n
    const answer = this.next(m => m.stats === id ? m as unknown as VictimStats : undefined, ms)
    this.write(`stats ${id}`)
    return await answer
  }

  /** Collects the victim's garbage, so that RSS shows what it holds rather than what it has not collected yet. */
  async gc (): Promise<void> {
    const done = this.next(m => m.gc === true ? true : undefined, 20_000)
    this.write('gc')
    await done
  }

  async reset (): Promise<void> {
    const done = this.next(m => m.reset === true ? true : undefined, 10_000)
    this.write('reset')
    await done
  }

  /** RSS (bytes) and CPU time (s) from /proc: readable however busy the victim is. */
  proc (): { rss: number, cpu: number } {
    const pid = this.child.pid!
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const rss = Number(/VmRSS:\s+(\d+)/.exec(status)![1]) * 1024
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
    return { rss, cpu: (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS }
  }

  /**
   * Asks for a read every `everyMs`, whether or not the last one came back (FUSE
   * requests do not wait for each other). Each is timed from when it was written
   * to the victim to when the victim had the chunk (its clock and ours are the
   * same wall clock): a late reply read by this busy process does not count.
   */
  probeReads (everyMs = 50): { stop: () => { count: number, maxMs: number, p99Ms: number } } {
    const sent = new Map<number, number>()
    const took: number[] = []
    let id = 0
    const wallNow = (): number => performance.timeOrigin + performance.now()
    this.on(m => {
      if (typeof m.read !== 'number') return
      const at = sent.get(m.read)
      if (at === undefined) return
      sent.delete(m.read)
      took.push((m.at as number) - at)
    })
    const timer = setInterval(() => {
      sent.set(++id, wallNow())
      this.write(`read ${id}`)
    }, everyMs)
    after(() => clearInterval(timer))
    return {
      stop: () => {
        clearInterval(timer)
        // Unanswered reads count as still running.
        for (const at of sent.values()) took.push(wallNow() - at)
        const sorted = took.sort((x, y) => x - y)
        return { count: sorted.length, maxMs: Math.round(sorted.at(-1) ?? 0), p99Ms: Math.round(sorted[Math.floor(sorted.length * 0.99)] ?? 0) }
      }
    }
  }
}

interface Progress { sentBytes: number, frames: number, receivedBytes: number, answers: number }

class Attacker extends Child {
  progress: Progress = { sentBytes: 0, frames: 0, receivedBytes: 0, answers: 0 }
  sentAll: { counts: Progress, ms: number } | undefined

  static async start (spec: Record<string, unknown>): Promise<Attacker> {
    // Through a file: a list of 3,000 digests is too long for an argument.
    const file = join(await tempDir('shoal-attacker-spec-'), 'spec.json')
    await writeFile(file, JSON.stringify(spec))
    const attacker = new Attacker(ATTACKER, file)
    // It stands for another machine: on a small test host it must not take the victim's CPU (the OS would stall the victim, not its code).
    try { setPriority(attacker.child.pid!, 19) } catch {}
    attacker.on(m => {
      if (m.progress !== undefined) attacker.progress = m.progress as Progress
      if (m.sent !== undefined) {
        attacker.progress = m.sent as Progress
        attacker.sentAll = { counts: m.sent as Progress, ms: m.ms as number }
      }
    })
    assert.ok(await attacker.next(m => m.ready === true ? true : undefined, 60_000), 'the attacker connected')
    return attacker
  }

  /** Waits until `done` holds or `ms` pass; true if it held. */
  async until (done: (a: Attacker) => boolean, ms: number): Promise<boolean> {
    const deadline = performance.now() + ms
    while (!done(this)) {
      if (performance.now() > deadline) return false
      await sleep(100)
    }
    return true
  }
}

const MiB = 1024 * 1024
const mb = (bytes: number): number => Math.round(bytes / MiB)

/** Baseline after start-up settles: RSS (after a collection) and CPU, and a fresh loop-delay histogram. */
async function baseline (victim: Victim): Promise<{ rss: number, cpu: number }> {
  await sleep(2000)
  await victim.gc()
  await victim.reset()
  return victim.proc()
}

/** RSS and CPU once the attack is over, after a collection. */
async function settled (victim: Victim, ms: number): Promise<{ rss: number, cpu: number }> {
  await sleep(ms)
  await victim.gc()
  return victim.proc()
}

function report (t: TestContext, what: string, numbers: Record<string, unknown>): void {
  t.diagnostic(`${what}: ${JSON.stringify(numbers)}`)
}

test('hostile: a HAVE? flood (40,000 queries for 3 packs, answers read) neither blocks the event loop nor draws answers beyond the peer\'s rate', async t => {
  // Before: the event loop blocked for 33.5 s, a read took 29.9 s; a reading attacker drew ~90x its bytes in answers.
  const victim = await Victim.start({ packs: 3, chunks: 2000, size: 4096, big: 0 })
  const before = await baseline(victim)
  const reads = victim.probeReads()
  const attacker = await Attacker.start({ target: victim.target, identities: 1, mode: 'have', count: 40_000, packs: victim.ready.packs })
  // The attacker sends as fast as the victim takes its queries; all 40,000 answered (the old code) ends it early.
  const started = performance.now()
  await attacker.until(a => a.progress.answers >= 40_000, ATTACK_MS)
  const seconds = (performance.now() - started) / 1000
  const readTimes = reads.stop()
  const stats = await victim.stats()
  const { sentBytes, receivedBytes, answers, frames } = attacker.progress
  await attacker.kill()
  const end = await settled(victim, 2000)
  const numbers = {
    seconds: +seconds.toFixed(1), queriesSent: frames, answers, sentMB: +(sentBytes / 1e6).toFixed(2), receivedMB: +(receivedBytes / 1e6).toFixed(2),
    amplification: +(receivedBytes / Math.max(1, sentBytes)).toFixed(2), lag: stats?.lag, reads: readTimes, rssMB: [mb(before.rss), mb(end.rss)],
    cpuS: +(end.cpu - before.cpu).toFixed(1), server: stats?.server
  }
  report(t, 'HAVE? flood', numbers)
  assert.ok(stats !== undefined, 'the victim answers')
  assert.ok(stats.lag.p99 < MAX_LAG_P99_MS, `event loop delay p99 ${stats.lag.p99} ms`)
  assert.ok(readTimes.maxMs < MAX_READ_MS, `slowest read ${readTimes.maxMs} ms`)
  const allowed = CHUNK_SERVER_DEFAULTS.haveBurst + CHUNK_SERVER_DEFAULTS.haveQueriesPerSecond * seconds
  assert.ok(answers <= allowed * 1.1, `${answers} answers in ${seconds.toFixed(1)} s (the peer's rate allows ${Math.round(allowed)})`)
  assert.ok(end.rss < before.rss * 1.2, `RSS ${mb(before.rss)} → ${mb(end.rss)} MiB`)
})

test('hostile: a JOIN flood (30,000 JOINs, 960k random swarm keys) does not grow memory without bound', async t => {
  // Before: RSS went from 542 to 1,434 MB and stayed there: every key was kept, for ever.
  const victim = await Victim.start({ packs: 1, chunks: 100, size: 4096, big: 0 })
  const before = await baseline(victim)
  const reads = victim.probeReads()
  const attacker = await Attacker.start({ target: victim.target, identities: 1, mode: 'join', count: 30_000 })
  // The attacker sends as fast as the victim takes its JOINs.
  await attacker.until(a => a.sentAll !== undefined, ATTACK_MS)
  const stats = await victim.stats(20_000)
  const readTimes = reads.stop()
  const sent = attacker.progress
  await attacker.kill()
  const end = await settled(victim, 2000)
  const numbers = {
    joinsSent: sent.frames, sentMB: +(sent.sentBytes / 1e6).toFixed(1), keys: stats?.keys,
    lag: stats?.lag, reads: readTimes, rssMB: [mb(before.rss), mb(end.rss)], server: stats?.server
  }
  report(t, 'JOIN flood', numbers)
  assert.ok(stats !== undefined, 'the victim answers')
  assert.ok(stats.keys <= FOREIGN_SWARM_LIMITS.maxKeys, `swarm keys held: ${stats.keys}`)
  assert.ok(stats.lag.p99 < MAX_LAG_P99_MS, `event loop delay p99 ${stats.lag.p99} ms`)
  assert.ok(readTimes.maxMs < MAX_READ_MS, `slowest read ${readTimes.maxMs} ms`)
  assert.ok(end.rss < before.rss * 1.2, `RSS ${mb(before.rss)} → ${mb(end.rss)} MiB`)
})

test('hostile: a peer that asks for 192k chunks and never reads neither pins a core nor stalls reads', async t => {
  // Before: 45.6 CPU-s in 40 s, FUSE reads of 6-10 s; once it spun for over 10 minutes after the attacker left.
  // Watched for 30 s with the attacker connected (the issue: 40 s), then 10 s after it left.
  const victim = await Victim.start({ packs: 3, chunks: 2000, size: 4096, big: 0 })
  const before = await baseline(victim)
  const reads = victim.probeReads()
  const attacker = await Attacker.start({ target: victim.target, identities: 1, mode: 'want', count: 192_000, chunks: victim.ready.small, paused: true })
  await sleep(30_000)
  const during = victim.proc()
  // Still connected: what does the victim hold for it?
  const held = await victim.stats()
  const sentFrames = attacker.progress.frames
  await attacker.kill()
  const end = await settled(victim, 10_000)
  const readTimes = reads.stop()
  const stats = await victim.stats()
  const numbers = {
    sentFrames, cpuAttackS: +(during.cpu - before.cpu).toFixed(1), cpuAfterS: +(end.cpu - during.cpu).toFixed(1),
    lag: stats?.lag, reads: readTimes, rssMB: [mb(before.rss), mb(during.rss), mb(end.rss)], heldAt30s: held?.server, server: stats?.server
  }
  report(t, 'non-reader', numbers)
  assert.ok(stats !== undefined && held !== undefined, 'the victim answers')
  assert.ok(stats.lag.p99 < MAX_LAG_P99_MS, `event loop delay p99 ${stats.lag.p99} ms`)
  assert.ok(readTimes.maxMs < MAX_READ_MS, `slowest read ${readTimes.maxMs} ms`)
  assert.ok(end.cpu - during.cpu < 1, `CPU after the attacker left: ${(end.cpu - during.cpu).toFixed(1)} s in 10 s`)
  assert.ok(during.cpu - before.cpu < 5, `CPU under attack: ${(during.cpu - before.cpu).toFixed(1)} s in 30 s`)
  assert.ok(end.rss < before.rss * 1.2, `RSS ${mb(before.rss)} → ${mb(end.rss)} MiB`)
  // Its stream is closed (it read nothing for stallMs, or sent past what a paused stream buffers): nothing held for it.
  assert.equal(held.server.inProgress, 0, 'no request of the attacker in progress after 30 s')
  assert.equal(held.server.queuedBytes, 0, 'no byte queued for the attacker after 30 s')
})

test('hostile: four paused identities asking for compressed 1 MiB chunks are held to the global caps', async t => {
  // Before: RSS from 417 to 622 MB; every identity got the per-peer caps anew.
  const victim = await Victim.start({ packs: 1, chunks: 10, size: 4096, big: 64 })
  const before = await baseline(victim)
  const reads = victim.probeReads()
  const attacker = await Attacker.start({ target: victim.target, identities: 4, mode: 'want', count: 256, chunks: victim.ready.big, paused: true })
  let peak = before.rss
  let peakQueued = 0
  const until = performance.now() + 20_000
  while (performance.now() < until) {
    await sleep(250)
    peak = Math.max(peak, victim.proc().rss)
    const stats = await victim.stats(5000)
    peakQueued = Math.max(peakQueued, stats?.server.queuedBytes ?? 0)
  }
  const held = await victim.stats()
  await attacker.kill()
  const end = await settled(victim, 5000)
  const readTimes = reads.stop()
  const stats = await victim.stats()
  const numbers = {
    rssMB: [mb(before.rss), mb(peak), mb(end.rss)], peakQueuedMB: mb(peakQueued), cpuS: +(end.cpu - before.cpu).toFixed(1),
    lag: stats?.lag, reads: readTimes, server: stats?.server
  }
  report(t, 'paused identities', numbers)
  assert.ok(stats !== undefined, 'the victim answers')
  const cap = CHUNK_SERVER_DEFAULTS.maxQueuedBytes
  // The cap, and as much again for what is in flight beyond it (compression buffers, the streams' windows).
  assert.ok(peak - before.rss < 2 * cap, `RSS grew ${mb(peak - before.rss)} MiB under attack (cap on queued bytes: ${mb(cap)} MiB)`)
  assert.ok(peakQueued <= cap, `queued ${mb(peakQueued)} MiB`)
  assert.ok(stats.lag.p99 < MAX_LAG_P99_MS, `event loop delay p99 ${stats.lag.p99} ms`)
  assert.ok(readTimes.maxMs < MAX_READ_MS, `slowest read ${readTimes.maxMs} ms`)
  assert.ok(end.rss < before.rss * 1.2, `RSS ${mb(before.rss)} → ${mb(end.rss)} MiB`)
  assert.equal(held?.server.queuedBytes, 0, 'nothing queued any more for peers that took nothing for 20 s')
})

test('hostile: a reading peer that sends WANT then CANCEL in a tight loop neither stalls the agent nor grows its memory', async t => {
  // Before (CANCELs read at any rate): 22,000-50,000 rounds in 20 s, reads up to 0.5-1.1 s, loop delay p99 up
  // to 115 ms, RSS 165 → 300-370 MB and not given back (the heap was; V8 and malloc kept the pages).
  // Each round: a holder request for a held chunk and a parent request for a digest nobody knows
  // (the agent waits up to 5 s for a mount to learn it), both cancelled at once; every answer read.
  const victim = await Victim.start({ packs: 3, chunks: 2000, size: 4096, big: 0 })
  const before = await baseline(victim)
  const reads = victim.probeReads()
  const attacker = await Attacker.start({ target: victim.target, identities: 1, mode: 'churn', count: 2_000_000, chunks: victim.ready.small })
  await attacker.until(a => a.sentAll !== undefined, ATTACK_MS)
  const during = victim.proc()
  const stats = await victim.stats()
  const readTimes = reads.stop()
  const { frames, sentBytes, answers, receivedBytes } = attacker.progress
  await attacker.kill()
  // The parent requests' 5 s waits end with their cancels or the attacker's connection.
  const end = await settled(victim, 6000)
  const after = await victim.stats()
  const numbers = {
    frames, rounds: Math.floor(frames / 3), sentMB: +(sentBytes / 1e6).toFixed(1), answers, receivedMB: +(receivedBytes / 1e6).toFixed(1),
    lag: stats?.lag, reads: readTimes, rssMB: [mb(before.rss), mb(during.rss), mb(end.rss)], cpuS: +(during.cpu - before.cpu).toFixed(1),
    cpuAfterS: +(end.cpu - during.cpu).toFixed(1), memoryMB: [stats, after].map(m => m === undefined ? undefined : { heapUsed: mb(m.heapUsed), heapTotal: mb(m.heapTotal), external: mb(m.external), arrayBuffers: mb(m.arrayBuffers) }), server: stats?.server, serverAfter: after?.server
  }
  report(t, 'WANT/CANCEL churn', numbers)
  assert.ok(stats !== undefined && after !== undefined, 'the victim answers')
  assert.ok(stats.lag.p99 < MAX_LAG_P99_MS, `event loop delay p99 ${stats.lag.p99} ms`)
  assert.ok(readTimes.maxMs < MAX_READ_MS, `slowest read ${readTimes.maxMs} ms`)
  assert.ok(end.rss < before.rss * 1.2, `RSS ${mb(before.rss)} → ${mb(end.rss)} MiB`)
  assert.equal(after.server.inProgress, 0, 'nothing in progress once the attacker is gone')
})
