/**
 * One real-process run of a scenario: a rate-capped origin process, N real
 * `shoal agent` processes (each with its own state directory, and with netns
 * in its own network namespace behind a shaped link), optional bad peers, the
 * workload started on each node at its arrival time, faults injected on a
 * timer, and everything measured from outside:
 *
 * - per node: when its workload started and ended (completion time), when its
 *   mount was ready (the agent's own mountedAt) and when a poll first saw a read
 *   through it (polled every 500 ms, so ±500 ms), its exit code, its bytes by
 *   source, what it uploaded and to whom, its CPU time;
 * - the origin's bytes and requests every 250 ms (reported by the origin process).
 *
 * Teardown (workloads, agents, bad peers, origin, leftover mounts, namespaces,
 * state directories) runs in a finally block whatever failed, and every wait
 * is bounded, so a run always ends by itself.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdir, open, readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { SHOAL_BIN, startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats } from '../../src/agent/agent.ts'
import { callAgent } from '../../src/agent/control.ts'
import { sleep } from '../../src/util/limit.ts'
import type { BadPeerStats } from './bad-peer.ts'
import type { HostilePeerStats } from './hostile-peer.ts'
import type { PreparedImage } from './image.ts'
import { Network, type NetHost } from './netns.ts'
import type { OriginStatsLine } from './origin-process.ts'
import { cpuSeconds, exec, exited, jsonLines, machineCpu, stopChild } from './proc.ts'
import { arrivalTimes, countOf, killedNodes, mbitToBytes, type Scenario } from './scenario.ts'

export type RunMode = 'peers' | 'baseline' | 'lone'

export interface NodeResult {
  index: number
  /** When the workload was due and when it started, ms after the burst began. */
  arrivalMs: number
  startedMs?: number
  /** Workload start to end: the completion time. */
  completionMs?: number
  /** Workload start to the agent's mountedAt: metadata fetched, catalogs open, FUSE up. */
  mountMs?: number
  /** Workload start to the first poll that saw a read through the mount (polls every 500 ms). */
  firstReadMs?: number
  exitCode?: number
  outcome: 'ok' | 'failed' | 'killed' | 'not-started'
  /** Bytes the agent's resolver got, by source (memory hits counted per read). */
  sources: AgentStats['sources']
  /** Chunk bytes this node served to peers, and per peer id what it received from each. */
  uploadBytes: number
  receivedFrom: Record<string, number>
  peerId?: string
  verificationFailures: number
  bannedPeers: number
  unavailableChunks: number
  cpuSeconds?: number
  /** Of cpuSeconds, what the agent used from the burst's start on (start-up and the idle wait before it left out). */
  burstCpuSeconds?: number
  /** How late the agent's event loop ran (its lifetime p99 and max, ms): how starved it was. */
  eventLoop?: { p99Ms: number, maxMs: number }
  /** The agent's peer counters at the end (`shoal stats`: peer source, chunk server, DHT router), for diagnosis. */
  peer?: { source: Record<string, number>, server: Record<string, number>, router: Record<string, number>, connectedPeers: number }
  /** Only in the lone run: the same workload again with everything cached. */
  warmMs?: number
  error?: string
}

export interface OriginSample { tMs: number, bytesSent: number, requests: number }
export interface OriginTotals { bytesSent: number, requests: number, packBytes: number, metadataBytes: number, metadataRequests: number }

export interface ClusterResult {
  mode: RunMode
  nodes: NodeResult[]
  origin: OriginTotals & { samples: OriginSample[] }
  badPeers: Array<BadPeerStats & { peerId: string }>
  /** The flooding peers' last counters (real runs with the hostilePeers fault). */
  hostilePeers: Array<HostilePeerStats & { peerId: string }>
  events: Array<{ tMs: number, what: string }>
  /** From the first arrival to the last workload's end. */
  wallMs: number
  /** Share of the machine's CPU time that was busy during the burst. */
  cpuBusy: number
  notes: string[]
}

interface Node {
  result: NodeResult
  /** The agent's CPU seconds when the burst started. */
  cpuAtBurst?: number | undefined
  /** When its stats were last polled (performance.now()). */
  polledAt: number
  state: string
  host: NetHost | undefined
  agent?: AgentProcess
  workload?: ChildProcess
  polling: boolean
}

interface OriginProcess { child: ChildProcess, last: OriginStatsLine | undefined }

const POLL_MS = 500
/**
 * Once a node's first read is seen, its stats are polled this seldom (the end of the run
 * collects them anyway): a stats call costs a peers agent real CPU (its peer counters, its
 * connections), and every 500 ms it was 6 % of a starved agent's CPU in a 10-node burst.
 */
const POLL_AFTER_FIRST_READ_MS = 5000
const ORIGIN_KEYS = ['requests', 'bytesSent', 'packBytes', 'metadataBytes', 'metadataRequests'] as const
const WORKLOAD_GRACE_MS = 5000

export interface ClusterOptions {
  scenario: Scenario
  image: PreparedImage
  mode: RunMode
  /** Agent state and temp files, removed at the end. */
  dir: string
  /** Where the agents', origin's and bad peers' stderr go (kept). */
  logDir: string
  signal: AbortSignal
  log: (line: string) => void
  /** Called before teardown with each node's state directory (the lone run reads its cache there). */
  inspect?: (stateDirs: string[]) => Promise<void>
}

export async function runCluster (options: ClusterOptions): Promise<ClusterResult> {
  const run = new ClusterRun(options)
  try {
    return await run.execute()
  } finally {
    await run.teardown()
  }
}

class ClusterRun {
  private readonly s: Scenario
  private readonly o: ClusterOptions
  private readonly peers: boolean
  private readonly nodes: Node[]
  private readonly logs: string
  private readonly tmp: string
  private net: Network | undefined
  private originHost: NetHost | undefined
  private origin: OriginProcess | undefined
  /** Totals of origin processes that were stopped (outage): stats restart at 0 in a new process. */
  private readonly originBase: OriginTotals = { requests: 0, bytesSent: 0, packBytes: 0, metadataBytes: 0, metadataRequests: 0 }
  private originPort = 0
  private readonly samples: OriginSample[] = []
  private readonly badPeers: Array<{ child: ChildProcess, peerId: string, stats: BadPeerStats }> = []
  private readonly hostilePeers: Array<{ child: ChildProcess, peerId: string, stats: HostilePeerStats | undefined }> = []
  private readonly events: ClusterResult['events'] = []
  private readonly timers: NodeJS.Timeout[] = []
  /** Fault actions in progress (an origin restart), awaited by teardown so none outlives the run. */
  private readonly faultWork = new Set<Promise<void>>()
  private readonly notes: string[] = []
  private t0 = 0
  private t0Epoch = 0

  constructor (options: ClusterOptions) {
    this.o = options
    this.s = options.scenario
    this.peers = options.mode === 'peers'
    const count = options.mode === 'lone' ? 1 : this.s.nodes
    const arrivals = options.mode === 'lone' ? [0] : arrivalTimes(this.s)
    this.logs = options.logDir
    this.tmp = join(options.dir, 'tmp')
    this.nodes = Array.from({ length: count }, (_, index) => ({
      state: join(options.dir, 'state', `node-${index}`),
      host: undefined,
      polling: false,
      polledAt: -Infinity,
      result: { index, arrivalMs: arrivals[index]!, outcome: 'not-started', sources: {}, uploadBytes: 0, receivedFrom: {}, verificationFailures: 0, bannedPeers: 0, unavailableChunks: 0 }
    }))
  }

  async execute (): Promise<ClusterResult> {
    const { s, o } = this
    await Promise.all([mkdir(this.logs, { recursive: true }), mkdir(this.tmp, { recursive: true })])
    if (s.links.latencyMs > 0) this.notes.push(`links.latencyMs ${s.links.latencyMs} is not applied in real runs (this kernel has no netem); only the model applies it`)
    if (s.netns) {
      this.net = await Network.create(o.mode[0]!)
      this.originHost = await this.net.addHost('origin', 0, undefined)
    }
    this.origin = await this.startOrigin()
    o.log(`${o.mode}: origin at ${this.originUrl()}, ${s.origin.mbit} Mbit/s`)
    await this.startAgents()
    if (this.peers && s.faults.badPeers !== undefined) await this.startBadPeers(countOf(s.faults.badPeers.share, s.nodes))
    if (this.peers && s.faults.hostilePeers !== undefined) await this.startHostilePeers(countOf(s.faults.hostilePeers.share, s.nodes))
    if (this.peers) await this.waitForSwarm()
    o.signal.throwIfAborted()

    o.log(`${o.mode}: burst of ${this.nodes.length} workloads`)
    await Promise.all(this.nodes.map(async n => { n.cpuAtBurst = await cpuSeconds(n.agent?.child.pid) }))
    const cpuBefore = await machineCpu()
    this.t0 = performance.now()
    this.t0Epoch = Date.now()
    this.scheduleFaults()
    const poller = setInterval(() => { for (const n of this.nodes) void this.poll(n) }, POLL_MS)
    const deadline = setTimeout(() => { void this.stopWorkloads('the run bound (timeouts.runMs) passed') }, s.timeouts.runMs)
    const interrupted = (): void => { void this.stopWorkloads('the run was stopped') }
    o.signal.addEventListener('abort', interrupted, { once: true })
    try {
      await Promise.all(this.nodes.map(async n => {
        await sleep(n.result.arrivalMs, o.signal).catch(() => {})
        if (!o.signal.aborted && n.result.outcome !== 'killed') await this.runWorkload(n)
      }))
    } finally {
      clearInterval(poller)
      clearTimeout(deadline)
      o.signal.removeEventListener('abort', interrupted)
    }
    const wallMs = performance.now() - this.t0
    const cpuAfter = await machineCpu()
    o.signal.throwIfAborted()
    // One more stats line from the origin, so the totals include the last responses.
    await sleep(300, o.signal)
    const origin = { ...this.originTotals(), samples: this.samples }

    if (o.mode === 'lone' && this.nodes[0]!.result.outcome === 'ok') await this.warmRun(this.nodes[0]!)
    await Promise.all(this.nodes.map(async n => await this.collect(n)))
    await this.o.inspect?.(this.nodes.map(n => n.state))
    return {
      mode: o.mode,
      nodes: this.nodes.map(n => n.result),
      origin,
      badPeers: this.badPeers.map(b => ({ peerId: b.peerId, ...b.stats })),
      hostilePeers: this.hostilePeers.flatMap(h => h.stats !== undefined ? [{ peerId: h.peerId, ...h.stats }] : []),
      events: this.events,
      wallMs,
      cpuBusy: (cpuAfter.busy - cpuBefore.busy) / Math.max(1, cpuAfter.total - cpuBefore.total),
      notes: this.notes
    }
  }

  // --- origin -----------------------------------------------------------------

  private originUrl (): string {
    return `http://${this.originHost?.ip ?? '127.0.0.1'}:${this.originPort}`
  }

  private async startOrigin (): Promise<OriginProcess> {
    const args = JSON.stringify({
      dir: this.o.image.layout,
      host: this.originHost?.ip ?? '127.0.0.1',
      port: this.originPort,
      rate: mbitToBytes(this.s.origin.mbit),
      latencyMs: this.s.origin.latencyMs,
      packs: this.o.image.packs
    })
    const command = this.wrap(this.originHost, [process.execPath, join(import.meta.dirname, 'origin-process.ts'), args])
    const child = await this.spawnLogged(command, 'origin')
    const proc: OriginProcess = { child, last: undefined }
    const ready = await jsonLines<{ port: number }>(child, 'the origin process', 30_000, line => {
      const stats = line as OriginStatsLine
      proc.last = stats
      if (this.t0Epoch > 0) {
        this.samples.push({ tMs: stats.t - this.t0Epoch, bytesSent: this.originBase.bytesSent + stats.bytesSent, requests: this.originBase.requests + stats.requests })
      }
    })
    this.originPort = ready.port
    return proc
  }

  private async stopOrigin (): Promise<void> {
    const proc = this.origin
    if (proc === undefined) return
    this.origin = undefined
    await stopChild(proc.child)
    // Let the readline interface deliver the last stats line before it is added up.
    await sleep(50)
    if (proc.last !== undefined) {
      for (const key of ORIGIN_KEYS) this.originBase[key] += proc.last[key]
    }
  }

  /** What the origin has sent so far, over all its lifetimes (as of its last stats line, at most 250 ms old). */
  private originTotals (): OriginTotals {
    const totals = { ...this.originBase }
    for (const key of ORIGIN_KEYS) totals[key] += this.origin?.last?.[key] ?? 0
    return totals
  }

  // --- agents -----------------------------------------------------------------

  /** Seeds first (everyone bootstraps from nodes 0 and 1), then the rest, a few at a time: this machine has 2 cores. */
  private async startAgents (): Promise<void> {
    const seeds = this.peers ? this.nodes.slice(0, 2) : []
    for (const n of seeds) await this.startAgent(n, seeds.filter(p => p.agent !== undefined))
    const rest = this.nodes.filter(n => n.agent === undefined)
    for (let i = 0; i < rest.length; i += 4) {
      this.o.signal.throwIfAborted()
      await Promise.all(rest.slice(i, i + 4).map(async n => await this.startAgent(n, seeds)))
    }
    this.o.log(`${this.o.mode}: ${this.nodes.length} agents started`)
  }

  private async startAgent (n: Node, seeds: Node[]): Promise<void> {
    const { s } = this
    if (this.net !== undefined) n.host = await this.net.addHost(`n${n.result.index}`, 1 + n.result.index, s.links.mbit)
    const p2p = this.peers
      ? ['--listen', n.host !== undefined ? `/ip4/${n.host.ip}/tcp/4001` : '/ip4/127.0.0.1/tcp/0', ...seeds.flatMap(seed => ['--peer', seed.agent!.ready.multiaddrs![0]!])]
      : ['--no-p2p']
    const log = join(this.logs, `agent-${n.result.index}.log`)
    // A shell only to send stderr to the node's log; `exec` keeps the pid the agent's, so kill -9 hits the agent.
    const script = `exec ${this.wrap(n.host, [SHOAL_BIN]).map(shellQuote).join(' ')} "$@" 2>>${shellQuote(log)}`
    n.agent = await startAgentProcess(n.state, ['--origin', this.originUrl(), '--trust', this.o.image.pub, '--metrics', 'off', '--log-level', 'warn',
      '--chunk-timeout', String(s.timeouts.chunkMs), ...p2p], { command: ['/bin/sh', '-c', script, 'sh'], stderr: 'ignore', timeoutMs: s.timeouts.agentStartMs })
    n.result.peerId = n.agent.ready.peerId
  }

  /** Bounded wait until every agent is connected to the seeds (bootstrap dials can lag the ready line). */
  private async waitForSwarm (): Promise<void> {
    const want = Math.min(2, this.nodes.length - 1)
    const deadline = performance.now() + 30_000
    for (const n of this.nodes) {
      while (performance.now() < deadline) {
        const stats = await callAgent<AgentStats>(n.agent!.socket, 'GET', '/v1/stats', undefined, { signal: AbortSignal.timeout(5000) })
        if ((stats.peer?.connectedPeers ?? 0) >= want) break
        await sleep(100, this.o.signal)
      }
    }
    if (performance.now() >= deadline) this.notes.push('some agents were not connected to both seeds within 30 s when the burst started')
  }

  private async startBadPeers (count: number): Promise<void> {
    const seeds = this.nodes.slice(0, 2).map(n => n.agent!.ready.multiaddrs![0]!)
    for (let i = 0; i < count; i++) {
      const index = this.nodes.length + 1 + i
      const host = await this.net?.addHost(`b${i}`, index, this.s.links.mbit)
      const args = JSON.stringify({ stateDir: join(this.o.dir, 'state', `bad-${i}`), layout: this.o.image.layout, image: this.o.image.tag, listen: [host !== undefined ? `/ip4/${host.ip}/tcp/4001` : '/ip4/127.0.0.1/tcp/0'], bootstrap: seeds })
      const child = await this.spawnLogged(this.wrap(host, [process.execPath, join(import.meta.dirname, 'bad-peer.ts'), args]), `bad-${i}`)
      const entry = { child, peerId: '', stats: { wants: 0, corrupted: 0, haves: 0 } }
      entry.peerId = (await jsonLines<{ peerId: string }>(child, `bad peer ${i}`, 30_000, line => { entry.stats = line as BadPeerStats })).peerId
      this.badPeers.push(entry)
    }
    // Their provider records need a moment to land before the burst looks them up.
    await sleep(2000, this.o.signal)
    this.o.log(`${this.o.mode}: ${count} bad peers joined`)
  }

  /**
   * Flooding peers, after the agents (they are given every agent's address, as peer
   * exchange would give it to any member): their floods run through the whole burst.
   * Niced: each stands for another machine, and on this one must not take the CPU
   * that the agents it floods need (the OS would then stall them, not their code).
   */
  private async startHostilePeers (count: number): Promise<void> {
    const seeds = this.nodes.slice(0, 2).map(n => n.agent!.ready.multiaddrs![0]!)
    const targets = this.nodes.map(n => n.agent!.ready.multiaddrs![0]!)
    for (let i = 0; i < count; i++) {
      const index = this.nodes.length + 1 + countOf(this.s.faults.badPeers?.share ?? 0, this.s.nodes) + i
      const host = await this.net?.addHost(`h${i}`, index, this.s.links.mbit)
      const args = JSON.stringify({ stateDir: join(this.o.dir, 'state', `hostile-${i}`), layout: this.o.image.layout, image: this.o.image.tag, listen: [host !== undefined ? `/ip4/${host.ip}/tcp/4001` : '/ip4/127.0.0.1/tcp/0'], bootstrap: seeds, targets })
      const child = await this.spawnLogged(this.wrap(host, ['nice', '-n', '19', process.execPath, join(import.meta.dirname, 'hostile-peer.ts'), args]), `hostile-${i}`)
      const entry: { child: ChildProcess, peerId: string, stats: HostilePeerStats | undefined } = { child, peerId: '', stats: undefined }
      entry.peerId = (await jsonLines<{ peerId: string }>(child, `hostile peer ${i}`, 30_000, line => { entry.stats = line as HostilePeerStats })).peerId
      this.hostilePeers.push(entry)
    }
    // Their floods under way before the burst starts.
    await sleep(3000, this.o.signal)
    this.o.log(`${this.o.mode}: ${count} hostile peers flooding`)
  }

  // --- workloads --------------------------------------------------------------

  private async runWorkload (n: Node): Promise<void> {
    const r = n.result
    const started = performance.now()
    r.startedMs = started - this.t0
    try {
      r.exitCode = await this.workload(n)
    } catch (err) {
      r.exitCode = -1
      r.error = (err as Error).message
    }
    r.completionMs = performance.now() - started
    if (r.outcome !== 'killed') r.outcome = r.exitCode === 0 ? 'ok' : 'failed'
    void this.poll(n)
  }

  /** Runs the scenario's workload on node N once; resolves with its exit code. */
  private async workload (n: Node): Promise<number> {
    const w = this.s.workload
    if ('run' in w) {
      const command = this.wrap(n.host, ['env', `TMPDIR=${this.tmp}`, SHOAL_BIN, 'run', this.o.image.tag, '--state', n.state, '--', ...w.run])
      return await this.watch(n, spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] }))
    }
    // Reads go through the agent's FUSE mount; the reader's own network namespace does not matter.
    const mountpoint = join(n.state, 'mnt')
    await callAgent(n.agent!.socket, 'POST', '/v1/mounts', { image: this.o.image.tag, mountpoint }, { signal: AbortSignal.timeout(this.s.timeouts.runMs) })
    try {
      return await this.watch(n, spawn('cat', w.read.map(p => join(mountpoint, p)), { stdio: ['ignore', 'ignore', 'pipe'] }))
    } finally {
      await callAgent(n.agent!.socket, 'DELETE', '/v1/mounts', { mountpoint }, { signal: AbortSignal.timeout(10_000) }).catch(() => {})
    }
  }

  /** Keeps the tail of the workload's stderr for the report and waits for it to exit. */
  private async watch (n: Node, child: ChildProcess): Promise<number> {
    n.workload = child
    let stderr = ''
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr = (stderr + d).slice(-2000) })
    const code = await exited(child)
    n.workload = undefined
    if (code !== 0) n.result.error = stderr.trim().split('\n').slice(-3).join(' | ')
    return code
  }

  /** The lone node runs its workload a second time, everything cached: the model's CPU-only time. */
  private async warmRun (n: Node): Promise<void> {
    const started = performance.now()
    const code = await this.workload(n)
    if (code === 0) n.result.warmMs = performance.now() - started
  }

  private async stopWorkloads (why: string): Promise<void> {
    const running = this.nodes.filter(n => n.workload !== undefined)
    if (running.length === 0) return
    this.notes.push(`${running.length} workloads still running were stopped: ${why}`)
    await Promise.all(running.map(async n => {
      n.result.error = why
      await stopChild(n.workload!, WORKLOAD_GRACE_MS)
    }))
  }

  // --- faults -----------------------------------------------------------------

  private scheduleFaults (): void {
    const { faults } = this.s
    const at = (ms: number, what: string, fn: () => Promise<void> | void): void => {
      this.timers.push(setTimeout(() => {
        this.events.push({ tMs: performance.now() - this.t0, what })
        this.o.log(`${this.o.mode}: ${what}`)
        const work = Promise.resolve(fn()).catch((err: Error) => { this.notes.push(`fault "${what}" failed: ${err.message}`) })
        this.faultWork.add(work)
        void work.finally(() => this.faultWork.delete(work))
      }, ms))
    }
    if (faults.kill !== undefined && this.o.mode !== 'lone') {
      const doomed = killedNodes(this.s).map(i => this.nodes[i]!)
      at(faults.kill.atMs, `kill -9 of ${doomed.length} agents (nodes ${doomed.map(n => n.result.index).join(', ')})`, () => {
        for (const n of doomed) {
          n.agent!.child.kill('SIGKILL')
          n.result.outcome = 'killed'
        }
      })
    }
    if (faults.originOutage !== undefined && this.o.mode !== 'lone') {
      at(faults.originOutage.fromMs, 'origin stopped', async () => { await this.stopOrigin() })
      at(faults.originOutage.toMs, 'origin restarted on the same address', async () => { this.origin = await this.startOrigin() })
    }
  }

  // --- measurements -----------------------------------------------------------

  /** Keeps the latest stats of a node whose workload runs (a killed agent's last ones stay), and spots its mount and first read. */
  private async poll (n: Node): Promise<void> {
    if (n.polling || n.agent === undefined || n.result.outcome === 'killed' || n.result.startedMs === undefined) return
    if (n.result.firstReadMs !== undefined && n.workload !== undefined && performance.now() - n.polledAt < POLL_AFTER_FIRST_READ_MS) return
    n.polledAt = performance.now()
    n.polling = true
    try {
      const stats = await callAgent<AgentStats>(n.agent.socket, 'GET', '/v1/stats', undefined, { signal: AbortSignal.timeout(2000) })
      this.record(n, stats)
      const mount = stats.mounts[0]
      if (mount !== undefined) {
        n.result.mountMs ??= Date.parse(mount.mountedAt) - this.t0Epoch - n.result.startedMs
        if (mount.fs.reads > 0) n.result.firstReadMs ??= performance.now() - this.t0 - n.result.startedMs
      }
    } catch {
      // A dead or busy agent: its last stats stand.
    } finally {
      n.polling = false
    }
  }

  private record (n: Node, stats: AgentStats): void {
    const r = n.result
    r.sources = stats.sources
    // The peer source checks what peers send itself (and bans the sender); the resolver checks the rest.
    r.verificationFailures = Object.values(stats.verificationFailures).reduce((a, b) => a + b, 0) + (stats.peer?.source.verificationFailures ?? 0)
    r.unavailableChunks = stats.unavailable
    r.eventLoop = { p99Ms: stats.eventLoop.p99Ms, maxMs: stats.eventLoop.maxMs }
    if (stats.peer !== undefined) {
      r.uploadBytes = stats.peer.server.bytesServed
      r.receivedFrom = stats.peer.source.perPeerBytes
      r.bannedPeers = stats.peer.source.badPeers
      const { perPeerBytes: _, ...source } = stats.peer.source
      r.peer = { source, server: { ...stats.peer.server }, router: { ...stats.peer.router }, connectedPeers: stats.peer.connectedPeers }
    }
  }

  private async collect (n: Node): Promise<void> {
    if (n.agent === undefined || n.result.outcome === 'killed') return
    n.result.cpuSeconds = await cpuSeconds(n.agent.child.pid)
    if (n.result.cpuSeconds !== undefined && n.cpuAtBurst !== undefined) n.result.burstCpuSeconds = Math.round(100 * (n.result.cpuSeconds - n.cpuAtBurst)) / 100
    const stats = await callAgent<AgentStats>(n.agent.socket, 'GET', '/v1/stats', undefined, { signal: AbortSignal.timeout(5000) }).catch(() => undefined)
    if (stats !== undefined) this.record(n, stats)
  }

  // --- processes and teardown -------------------------------------------------

  private wrap (host: NetHost | undefined, command: string[]): string[] {
    return host?.wrap(command) ?? command
  }

  /** Spawns COMMAND with stdout piped and stderr appended to logs/NAME.log. */
  private async spawnLogged (command: string[], name: string): Promise<ChildProcess> {
    const file = await open(join(this.logs, `${name}.log`), 'a')
    try {
      return spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', file.fd] })
    } finally {
      await file.close()
    }
  }

  async teardown (): Promise<void> {
    const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      await fn().catch((err: Error) => this.o.log(`teardown: ${what}: ${err.message}`))
    }
    for (const t of this.timers) clearTimeout(t)
    await Promise.allSettled(this.faultWork)
    await step('workloads', async () => await this.stopWorkloads('teardown'))
    await step('agents', async () => await Promise.all(this.nodes.map(async n => await n.agent?.stop(10_000))))
    await step('bad peers', async () => await Promise.all(this.badPeers.map(async b => await stopChild(b.child))))
    await step('hostile peers', async () => await Promise.all(this.hostilePeers.map(async h => await stopChild(h.child))))
    await step('origin', async () => await this.stopOrigin())
    await step('mounts', async () => await unmountBelow(this.o.dir))
    await step('namespaces', async () => await this.net?.destroy())
    await step('state', async () => await rm(join(this.o.dir, 'state'), { recursive: true, force: true }))
    await step('temp', async () => await rm(this.tmp, { recursive: true, force: true }))
  }
}

/**
 * Unmounts whatever is still mounted under DIR, deepest first: FUSE mounts of
 * killed agents (`fusermount -uz`, which works on a dead endpoint) and the
 * overlays `shoal run` put on them (its TMPDIR is under DIR).
 */
async function unmountBelow (dir: string): Promise<void> {
  const mounts = await mountsBelow(dir)
  for (const m of mounts.sort((a, b) => b.path.length - a.path.length)) {
    if (m.fstype.startsWith('fuse')) await exec('fusermount', ['-uz', m.path])
    else await exec('umount', ['-l', m.path])
  }
}

/** Mounts at or below DIR, from /proc/self/mountinfo (the runner shares the agents' mount namespace). */
export async function mountsBelow (dir: string): Promise<Array<{ path: string, fstype: string }>> {
  const out: Array<{ path: string, fstype: string }> = []
  for (const line of (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
    const [before, after] = line.split(' - ')
    if (after === undefined) continue
    const path = before!.split(' ')[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))
    if (path === dir || path.startsWith(dir + '/')) out.push({ path, fstype: after.split(' ')[0]! })
  }
  return out
}

function shellQuote (s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`
}
