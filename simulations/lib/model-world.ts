/**
 * The model's cluster: nodes that run the agent's read path in simulated time.
 *
 * Each node follows the control flow of the real modules, step for step, with
 * their default timeouts, and calls the REAL burst policy for every decision:
 * `selectSources`, `topNodes`, `spreadKey`, `chunkKey` and `nodeKey` come from
 * src/p2p/rendezvous.ts, bans from src/p2p/bans.ts. What is modelled rather than
 * run is everything around the policy:
 *
 * - ChunkResolver: singleflight per chunk, 3 passes over [peers, origin] with
 *   200/400 ms pauses, bounded by the chunk timeout; a failed read is retried
 *   once (the kernel does that for FUSE) before the workload sees EIO.
 * - PeerChunkSource: the pack's swarm from a (cached 5 s) DHT lookup, waited for
 *   at most 1.5 s; availability (HAVE) from 4 sampled peers, trusted 5 s, waited
 *   for at most 500 ms; holders raced two at a time with a 200 ms hedge; owners
 *   asked with a 2 s owner wait, 2 pending rounds, 500 ms peer deadline; a 6 s
 *   bound per get; bans for bad bytes, doubling suspicion for dead or slow peers.
 * - ChunkServer and the agent's LocalChunks: a node acts as owner only for
 *   chunks its catalogs vouch for (so once mounted; a catalog once it holds
 *   it), at most 32 origin fetches at a time for peers, through its own
 *   resolver; `pending` when the owner wait runs out; chunks travel uncompressed.
 * - DhtPackRouter: packs are announced at mount (and on first need); a lookup sees the nodes
 *   whose announce has landed by the time its walk ends. A walk costs lookupMs,
 *   a provide announceMs, each plus dhtRpcMs per DHT peer it talks to (the k =
 *   20 closest, or all nodes in a smaller cluster), all as CPU work, so that on
 *   shared cores a DHT storm slows everything down, as it does in real runs;
 *   and libp2p's upkeep costs each node upkeepMsPerPeer of CPU per second per
 *   connected peer (up to 20).
 * - HttpOrigin: 8 requests in flight per node, 10 s per attempt, 4 retries with
 *   backoff; the origin sends stored (compressed) bytes through its capped link.
 * - The workload: mount (index, manifest, config and signature from the origin;
 *   then each catalog announced and resolved like a chunk, through peers; then
 *   every pack of the image announced; then mountMs of CPU), then the profile's
 *   chunks in order, readWindow at a time, and its own CPU (workloadCpuMs in
 *   all) spread over the chunks, one think at a time.
 *
 * These defaults are restated from src (they are not exported there); if they
 * change in src, change them here.
 */
import { PeerBans } from '../../src/p2p/bans.ts'
import { chunkKey, nodeKey, selectSources, spreadKey, topNodes, type ChunkKey, type NodeKey } from '../../src/p2p/rendezvous.ts'
import type { ClusterResult, NodeResult, OriginSample } from './cluster.ts'
import { makeCpu, type Cpu } from './cpu.ts'
import { deferred, Simulator, TimeoutError } from './des.ts'
import type { WorkloadProfile } from './image.ts'
import { Link, Transfer } from './links.ts'
import { arrivalTimes, countOf, killedNodes, mbitToBytes, seededRandom, type ModelParams, type Scenario } from './scenario.ts'

const PEER = { timeoutMs: 500, hedgeDelayMs: 200, ownerWaitMs: 2000, maxPendingRounds: 2, maxWaitMs: 6000, lookupWaitMs: 1500, banMs: 300_000, suspectMs: 10_000, availabilityTtlMs: 5000, availabilitySample: 4, maxOwners: 2, maxHolders: 4 }
const SERVER = { maxConcurrentPerPeer: 64, maxWaitMs: 5000, maxOwnerFetches: 32 }
const RESOLVER = { attempts: 3, retryDelayMs: 200 }
const HTTP = { retries: 4, baseDelayMs: 100, maxDelayMs: 2000, requestTimeoutMs: 10_000, concurrency: 8 }
const SAMPLE_MS = 250

export type ModelMode = 'peers' | 'baseline' | 'lone'

export interface ModelOptions {
  scenario: Scenario
  profile: WorkloadProfile
  mode: ModelMode
}

interface Chunk {
  digest: string
  key: ChunkKey
  pack: string
  length: number
  storedLength: number
  /** A catalog blob as a chunk of its own (the origin counts it as metadata). */
  catalog: boolean
}

/** What a mount fetches: small metadata (BYTES in REQUESTS) from the origin, then the catalogs; then it announces the packs. */
interface MountPlan { bytes: number, requests: number, catalogs: Chunk[], packs: string[] }

interface Holding { peer: Node, chunks: ReadonlySet<string>, expires: number, complete: boolean }
interface Lookup { done: boolean, found: Node[], expires: number, finished: Promise<void> }
type Reply = 'data' | 'bad-data' | 'dont-have' | 'busy' | 'pending'

class PeerGone extends Error {}

/** The shared parts: clock, origin, provider records, parameters. */
class World {
  readonly sim = new Simulator()
  readonly p: ModelParams & { workloadCpuMs: number }
  readonly s: Scenario
  readonly peers: boolean
  readonly origin: Link
  originAlive = true
  readonly originStats = { requests: 0, packBytes: 0, metadataBytes: 0, metadataRequests: 0 }
  /** Nodes whose announce of a pack has landed, by pack, and the last list of them handed out. */
  private readonly providers = new Map<string, { nodes: Set<Node>, list: Node[] | undefined }>()
  readonly packChunks = new Map<string, Chunk[]>()
  readonly packKeys = new Map<string, ChunkKey>()
  readonly sharedCpu: Cpu | undefined
  readonly random: () => number
  /** CPU of the RPCs in one DHT walk or provide: one per peer among the k = 20 closest. */
  readonly dhtRpcCost: number

  constructor (options: ModelOptions) {
    this.s = options.scenario
    this.p = { ...options.scenario.model, workloadCpuMs: options.scenario.model.workloadCpuMs ?? options.profile.lone.warmMs }
    this.peers = options.mode === 'peers'
    this.origin = new Link(this.sim, 'origin', mbitToBytes(this.s.origin.mbit))
    this.sharedCpu = this.p.sharedCores > 0 ? makeCpu(this.sim, this.p.sharedCores) : undefined
    this.random = seededRandom(this.s.seed + 2)
    this.dhtRpcCost = this.p.dhtRpcMs * Math.min(20, this.s.nodes - 1)
  }

  /** The machine's shared cores (calibration against a real run), or a core of the node's own. */
  cpu (): Cpu {
    return this.sharedCpu ?? makeCpu(this.sim, 1)
  }

  /** NODE's provider record for PACK has landed. */
  provide (pack: string, node: Node): void {
    let entry = this.providers.get(pack)
    if (entry === undefined) this.providers.set(pack, entry = { nodes: new Set(), list: undefined })
    entry.nodes.add(node)
    entry.list = undefined
  }

  /**
   * What a lookup finds: every provider of PACK so far. Lookups between two
   * landings share one array, so 10,000 nodes do not each keep a 10,000-long copy.
   */
  providersOf (pack: string): Node[] {
    const entry = this.providers.get(pack)
    if (entry === undefined) return []
    entry.list ??= [...entry.nodes]
    return entry.list
  }

  chunk (c: { digest: string, pack: string, length: number, storedLength: number }, catalog = false): Chunk {
    const chunk = { digest: c.digest, key: chunkKey(c.digest), pack: c.pack, length: c.length, storedLength: c.storedLength, catalog }
    if (!this.packKeys.has(c.pack)) {
      this.packKeys.set(c.pack, chunkKey(c.pack))
      this.packChunks.set(c.pack, [])
    }
    this.packChunks.get(c.pack)!.push(chunk)
    return chunk
  }
}

/** One agent (and its workload). Implements NodeKey, so the real rendezvous code ranks it directly. */
class Node implements NodeKey {
  readonly id: string
  readonly a: number
  readonly b: number
  readonly index: number
  readonly up: Link
  readonly down: Link
  readonly bad: boolean
  alive = true
  mounted = false
  readonly held = new Set<string>()
  readonly result: NodeResult
  private readonly w: World
  private readonly cpu: Cpu
  private readonly flights = new Map<string, Promise<boolean>>()
  private readonly announced = new Set<string>()
  private readonly lookups = new Map<string, Lookup>()
  private readonly availability = new Map<string, Map<string, Holding>>()
  private readonly haveQueries = new Map<string, Promise<void>>()
  private readonly suspects = new Map<string, { until: number, failures: number }>()
  private readonly bans: PeerBans
  private readonly everBanned = new Set<string>()
  private readonly ownerFetches = new Map<string, number>()
  private ownerFetchesInFlight = 0
  private readonly serving = new Map<string, number>()
  private originSlots = HTTP.concurrency
  private readonly slotWaiters: Array<() => void> = []
  private thinking: Promise<void> = Promise.resolve()

  constructor (w: World, index: number, bad: boolean) {
    this.w = w
    this.index = index
    this.bad = bad
    // Peer-id-like names: the ids share a long prefix, as real ones do (nodeKey mixes for that).
    const key = nodeKey(`12D3KooW${(index * 2654435761 >>> 0).toString(36).padStart(8, '0')}${index.toString(36)}`)
    this.id = key.id
    this.a = key.a
    this.b = key.b
    const rate = mbitToBytes(w.s.links.mbit)
    this.up = new Link(w.sim, `${index} up`, rate)
    this.down = new Link(w.sim, `${index} down`, rate)
    this.cpu = w.cpu()
    this.bans = new PeerBans({ now: () => w.sim.now })
    this.result = { index, arrivalMs: 0, outcome: 'not-started', sources: {}, uploadBytes: 0, receivedFrom: {}, peerId: this.id, verificationFailures: 0, bannedPeers: 0, unavailableChunks: 0 }
  }

  private get sim (): Simulator { return this.w.sim }

  /** MS of work on this node's CPU (the machine's, with shared cores). */
  cpuWork (ms: number): Promise<void> { return this.cpu.work(ms) }
  private get latency (): number { return this.w.s.links.latencyMs }

  // --- the workload -------------------------------------------------------------

  async runWorkload (chunks: Chunk[], plan: MountPlan): Promise<void> {
    const r = this.result
    const started = this.sim.now
    r.startedMs = started
    try {
      await this.mount(plan)
      r.mountMs = this.sim.now - started
      let next = 0
      let failed = false
      const think = this.w.p.workloadCpuMs / Math.max(1, chunks.length)
      const reader = async (): Promise<void> => {
        while (next < chunks.length && !failed && this.alive) {
          const chunk = chunks[next++]!
          // A failed FUSE read is retried once by the kernel before the application sees EIO.
          if (!await this.resolve(chunk) && !await this.resolve(chunk)) failed = true
          else await this.think(think)
        }
      }
      await Promise.all(Array.from({ length: this.w.p.readWindow }, reader))
      if (failed) throw new Error('a read failed with EIO')
      if (!this.alive) return
      r.completionMs = this.sim.now - started
      r.outcome = 'ok'
    } catch (err) {
      if (!this.alive) return
      r.completionMs = this.sim.now - started
      r.outcome = 'failed'
      r.error = (err as Error).message
    }
  }

  /** As Agent.mount: the image's small metadata from the origin, each catalog through the resolver, every pack announced, then the mount's own work. */
  private async mount (plan: MountPlan): Promise<void> {
    const signal = this.sim.timeout(120_000) // the agent's bound on setting up a mount
    for (let i = 0; i < plan.requests; i++) {
      if (!await this.originGet(plan.bytes / plan.requests, 'metadata', signal)) throw new Error('mount failed: metadata unavailable from the origin')
    }
    for (const catalog of plan.catalogs) {
      if (this.w.peers) this.announce(catalog.pack)
      if (!await this.resolve(catalog)) throw new Error('mount failed: a catalog was unavailable')
    }
    if (this.w.peers) for (const pack of plan.packs) this.announce(pack)
    await this.cpu.work(this.w.p.mountMs)
    this.mounted = true
  }

  /** The application's own work between reads: one thread, so one think at a time. */
  private async think (ms: number): Promise<void> {
    const previous = this.thinking
    const mine = previous.then(async () => await this.cpu.work(ms))
    this.thinking = mine
    await mine
  }

  kill (): void {
    this.alive = false
    this.result.outcome = 'killed'
    for (const t of [...this.up.transfers, ...this.down.transfers]) t.abort(new PeerGone(`node ${this.index} died`))
  }

  // --- ChunkResolver ------------------------------------------------------------

  /** True once the chunk is held (verified), false when every pass failed or the chunk timeout ran out. */
  resolve (chunk: Chunk): Promise<boolean> {
    if (this.held.has(chunk.digest)) return Promise.resolve(true)
    let flight = this.flights.get(chunk.digest)
    if (flight === undefined) {
      flight = this.fetch(chunk).finally(() => this.flights.delete(chunk.digest))
      this.flights.set(chunk.digest, flight)
    }
    return flight
  }

  private async fetch (chunk: Chunk): Promise<boolean> {
    const signal = this.sim.timeout(this.w.s.timeouts.chunkMs)
    try {
      for (let attempt = 0; attempt < RESOLVER.attempts; attempt++) {
        if (attempt > 0) await this.sim.sleep(RESOLVER.retryDelayMs * 2 ** (attempt - 1), signal)
        if (this.w.peers && await this.peerGet(chunk, signal)) return this.landed(chunk, 'peers')
        if (await this.originGet(chunk.storedLength, chunk.catalog ? 'metadata' : 'pack', signal)) return this.landed(chunk, 'origin')
      }
    } catch (err) {
      if (!(err instanceof TimeoutError)) throw err
    }
    if (this.alive) this.result.unavailableChunks++
    return false
  }

  private async landed (chunk: Chunk, source: 'peers' | 'origin'): Promise<boolean> {
    // Verifying (and, from the origin, decompressing) costs CPU before the bytes count as held.
    await this.cpu.work(this.w.p.cpuMsPerMB * chunk.length / 1e6)
    this.held.add(chunk.digest)
    if (chunk.catalog) return true // the agent's source stats count chunk reads, and so does the report
    const s = (this.result.sources[source] ??= { chunks: 0, bytes: 0 })
    s.chunks++
    s.bytes += chunk.length
    return true
  }

  // --- HttpOrigin ---------------------------------------------------------------

  /** BYTES from the origin with HttpOrigin's retries; false when it gave up. Rejects only when SIGNAL aborts. */
  private async originGet (bytes: number, kind: 'pack' | 'metadata', signal: AbortSignal): Promise<boolean> {
    for (let n = 0; ; n++) {
      try {
        await this.originAttempt(bytes, kind, signal)
        return true
      } catch (err) {
        if (signal.aborted) throw signal.reason
        if (n >= HTTP.retries || !this.alive) return false
        if (!(err instanceof PeerGone || err instanceof TimeoutError)) throw err
        // Equal jitter, as RetryingRequests does.
        const step = Math.min(HTTP.maxDelayMs, HTTP.baseDelayMs * 2 ** n)
        await this.sim.sleep(step / 2 + this.w.random() * step / 2, signal)
      }
    }
  }

  private async originAttempt (bytes: number, kind: 'pack' | 'metadata', signal: AbortSignal): Promise<void> {
    await this.acquireOriginSlot(signal)
    const attempt = AbortSignal.any([signal, this.sim.timeout(HTTP.requestTimeoutMs)])
    try {
      this.w.originStats.requests++
      await this.request(this.w.s.origin.latencyMs + 2 * this.latency, attempt)
      if (!this.w.originAlive) throw new PeerGone('connection refused')
      await this.receive(new Transfer(this.sim, this.w.origin, this.down, bytes, this.transferOptions()), attempt, true)
      if (kind === 'pack') this.w.originStats.packBytes += bytes
      else {
        this.w.originStats.metadataBytes += bytes
        this.w.originStats.metadataRequests++
      }
    } catch (err) {
      if (signal.aborted) throw signal.reason
      if (attempt.aborted) throw new TimeoutError(HTTP.requestTimeoutMs)
      throw err
    } finally {
      this.releaseOriginSlot()
    }
  }

  private async acquireOriginSlot (signal: AbortSignal): Promise<void> {
    if (this.originSlots > 0) {
      this.originSlots--
      return
    }
    const slot = deferred<void>(this.sim)
    this.slotWaiters.push(slot.resolve)
    const onAbort = (): void => {
      const i = this.slotWaiters.indexOf(slot.resolve)
      if (i >= 0) this.slotWaiters.splice(i, 1)
      slot.reject(signal.reason)
    }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      await slot.promise
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  private releaseOriginSlot (): void {
    const next = this.slotWaiters.shift()
    if (next !== undefined) next()
    else this.originSlots++
  }

  /** A request on its way: LATENCYMS on the wire, then requestOverheadMs of CPU to handle it (which contends, with shared cores). */
  private async request (latencyMs: number, signal: AbortSignal): Promise<void> {
    await this.sim.sleep(latencyMs, signal)
    await abortable(this.cpu.work(this.w.p.requestOverheadMs), signal)
  }

  private transferOptions (): { latencyMs: number, pieceBytes: number } {
    return { latencyMs: this.latency, pieceBytes: this.w.p.pieceBytes }
  }

  /**
   * Waits for transfer T. If SIGNAL aborts first: an origin response stops (the
   * connection closes); a peer's chunk that started is already in the socket and
   * arrives anyway, only nobody waits for it.
   */
  private async receive (t: Transfer, signal: AbortSignal, stopOnAbort: boolean): Promise<void> {
    if (!this.alive) t.abort(new PeerGone(`node ${this.index} is dead`)) // its leftover async work must not load the links
    const onAbort = (): void => { if (stopOnAbort || !t.started) t.abort(new PeerGone('cancelled')) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      await abortable(t.done, signal)
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  // --- PeerChunkSource ----------------------------------------------------------

  private async peerGet (chunk: Chunk, signal: AbortSignal): Promise<boolean> {
    const budget = AbortSignal.any([signal, this.sim.timeout(PEER.maxWaitMs)])
    try {
      return await this.find(chunk, budget)
    } catch (err) {
      if (signal.aborted) throw signal.reason
      if (!budget.aborted) throw err
      return false
    }
  }

  private async find (chunk: Chunk, signal: AbortSignal): Promise<boolean> {
    this.announce(chunk.pack)
    const swarm = await this.swarm(chunk.pack, signal)
    await this.refreshAvailability(chunk.pack, swarm, signal)
    const selection = selectSources({
      key: chunk.key,
      self: this as Node,
      swarm,
      holders: this.holders(chunk),
      excluded: id => this.excluded(id),
      maxOwners: PEER.maxOwners,
      maxHolders: PEER.maxHolders
    })
    if (selection.holders.length > 0 && await this.fromHolders(selection.holders, chunk, signal)) return true
    if (selection.selfIsOwner || this.ownerFetches.has(chunk.digest)) return false
    for (const owner of selection.owners) {
      if (await this.fromOwner(owner, chunk, signal)) return true
    }
    return false
  }

  /** DhtPackRouter.announce: once per pack; visible to lookups once the provide's work is done. */
  private announce (pack: string): void {
    if (this.announced.has(pack)) return
    this.announced.add(pack)
    void this.cpu.work(this.w.p.announceMs + this.w.dhtRpcCost).then(() => {
      if (!this.alive) return
      this.w.provide(pack, this)
    })
  }

  /** The pack's swarm (self included once announced): one lookup at a time, reused for lookupCacheMs after it ends, waited for at most 1.5 s. */
  private async swarm (pack: string, signal: AbortSignal): Promise<Node[]> {
    let lookup = this.lookups.get(pack)
    if (lookup === undefined || (lookup.done && lookup.expires <= this.sim.now)) {
      const walk = deferred<void>(this.sim)
      const fresh: Lookup = { done: false, found: [], expires: Infinity, finished: walk.promise }
      this.lookups.set(pack, fresh)
      void this.cpu.work(this.w.p.lookupMs + this.w.dhtRpcCost).then(() => {
        // Self is in it once its own announce has landed; selectSources accepts that (and adds self if not).
        fresh.found = this.w.providersOf(pack)
        fresh.done = true
        fresh.expires = this.sim.now + this.w.p.lookupCacheMs
        walk.resolve()
      })
      lookup = fresh
    }
    if (!lookup.done) {
      const wait = AbortSignal.any([signal, this.sim.timeout(PEER.lookupWaitMs)])
      await abortable(lookup.finished, wait).catch(() => {})
      signal.throwIfAborted()
    }
    return lookup.done ? lookup.found : []
  }

  private async refreshAvailability (pack: string, swarm: Node[], signal: AbortSignal): Promise<void> {
    const sample = topNodes(spreadKey(this.w.packKeys.get(pack)!, this), swarm, PEER.availabilitySample, p => p === this || this.excluded(p.id))
    const queries = sample.filter(p => !this.fresh(pack, p.id)).map(p => this.queryHave(pack, p))
    if (queries.length === 0) return
    const wait = AbortSignal.any([signal, this.sim.timeout(PEER.timeoutMs)])
    await abortable(Promise.allSettled(queries), wait).catch(() => {})
    signal.throwIfAborted()
  }

  private queryHave (pack: string, peer: Node): Promise<void> {
    const key = `${pack} ${peer.id}`
    let query = this.haveQueries.get(key)
    if (query === undefined) {
      query = this.request(this.latency, this.sim.timeout(PEER.timeoutMs))
        .then(async () => {
          if (!peer.alive) throw new PeerGone('connection refused')
          const chunks = peer.heldIn(pack)
          await this.sim.sleep(this.latency)
          this.healthy(peer)
          this.setHolding(pack, { peer, chunks, expires: this.sim.now + PEER.availabilityTtlMs, complete: true })
        })
        .catch(() => this.failed(peer))
        .finally(() => this.haveQueries.delete(key))
      this.haveQueries.set(key, query)
    }
    return query
  }

  /** At most two holders in flight; the second starts when the first fails or is slower than the hedge delay. */
  private async fromHolders (holders: Node[], chunk: Chunk, signal: AbortSignal): Promise<boolean> {
    const done = new AbortController()
    const scope = AbortSignal.any([signal, done.signal])
    const running = new Map<Node, Promise<{ peer: Node, ok: boolean }>>()
    let next = 0
    const launch = (): void => {
      const peer = holders[next++]!
      running.set(peer, this.attempt(peer, chunk, { fetch: false, waitMs: 0 }, scope).then(result => ({ peer, ok: result === 'data' })))
    }
    try {
      launch()
      while (running.size > 0) {
        const timer = new AbortController()
        const contenders: Array<Promise<'hedge' | 'stop' | { peer: Node, ok: boolean }>> = [...running.values()]
        if (next < holders.length && running.size < 2) {
          contenders.push(this.sim.sleep(PEER.hedgeDelayMs, AbortSignal.any([timer.signal, scope])).then(() => 'hedge' as const, () => 'stop' as const))
        }
        const first = await Promise.race(contenders)
        timer.abort()
        if (first === 'stop') return false
        if (first === 'hedge') {
          launch()
          continue
        }
        running.delete(first.peer)
        if (first.ok) return true
        if (next < holders.length && running.size < 2) launch()
      }
      return false
    } finally {
      done.abort()
    }
  }

  private async fromOwner (owner: Node, chunk: Chunk, signal: AbortSignal): Promise<boolean> {
    for (let round = 0; round < PEER.maxPendingRounds; round++) {
      const result = await this.attempt(owner, chunk, { fetch: true, waitMs: PEER.ownerWaitMs }, signal)
      if (result !== 'pending') return result === 'data'
    }
    return false
  }

  /** One request to one peer under its own deadline; every failure is booked here. */
  private async attempt (peer: Node, chunk: Chunk, ask: { fetch: boolean, waitMs: number }, signal: AbortSignal): Promise<Reply | undefined> {
    const deadline = this.sim.timeout(ask.waitMs + PEER.timeoutMs)
    let reply: Reply
    try {
      reply = await peer.serve(this, chunk, ask, AbortSignal.any([signal, deadline]))
    } catch {
      if (!signal.aborted) this.failed(peer)
      return undefined
    }
    this.healthy(peer)
    switch (reply) {
      case 'bad-data':
        // The length is right, the SHA-256 is not: ban, forget what it claimed, try elsewhere.
        this.result.verificationFailures++
        this.ban(peer)
        return undefined
      case 'data':
        this.result.receivedFrom[peer.id] = (this.result.receivedFrom[peer.id] ?? 0) + chunk.length
        this.noteHolds(chunk, peer)
        return 'data'
      case 'dont-have':
        this.availability.get(chunk.pack)?.delete(peer.id)
        return reply
      default:
        return reply
    }
  }

  private ban (peer: Node): void {
    if (!this.bans.isBanned(peer.id)) {
      this.bans.ban(peer.id, PEER.banMs)
      this.everBanned.add(peer.id)
      this.result.bannedPeers = this.everBanned.size
    }
    for (const holdings of this.availability.values()) holdings.delete(peer.id)
  }

  private failed (peer: Node): void {
    const failures = (this.suspects.get(peer.id)?.failures ?? 0) + 1
    this.suspects.set(peer.id, { until: this.sim.now + Math.min(PEER.banMs, PEER.suspectMs * 2 ** (failures - 1)), failures })
  }

  private healthy (peer: Node): void {
    this.suspects.delete(peer.id)
  }

  private excluded (id: string): boolean {
    return this.bans.isBanned(id) || (this.suspects.get(id)?.until ?? 0) > this.sim.now
  }

  // --- availability -------------------------------------------------------------

  private fresh (pack: string, id: string): boolean {
    const h = this.availability.get(pack)?.get(id)
    return h !== undefined && h.complete && h.expires > this.sim.now
  }

  private setHolding (pack: string, holding: Holding): void {
    let holdings = this.availability.get(pack)
    if (holdings === undefined) this.availability.set(pack, holdings = new Map())
    holdings.set(holding.peer.id, holding)
  }

  /** A peer just sent us this chunk: it holds it, whatever its last answer said. */
  private noteHolds (chunk: Chunk, peer: Node): void {
    const current = this.availability.get(chunk.pack)?.get(peer.id)
    if (current !== undefined && current.expires > this.sim.now) {
      current.chunks = new Set([...current.chunks, chunk.digest])
    } else {
      this.setHolding(chunk.pack, { peer, chunks: new Set([chunk.digest]), expires: this.sim.now + PEER.availabilityTtlMs, complete: false })
    }
  }

  private holders (chunk: Chunk): Node[] {
    const holdings = this.availability.get(chunk.pack)
    if (holdings === undefined) return []
    const found: Node[] = []
    for (const [id, h] of holdings) {
      if (h.expires <= this.sim.now) holdings.delete(id)
      else if (h.chunks.has(chunk.digest)) found.push(h.peer)
    }
    return found
  }

  /** What this node would answer to HAVE? for a pack; a bad peer claims all of an image pack (it knows no catalogs). */
  heldIn (pack: string): ReadonlySet<string> {
    const chunks = this.w.packChunks.get(pack) ?? []
    return new Set(chunks.filter(c => (this.bad && !c.catalog) || this.held.has(c.digest)).map(c => c.digest))
  }

  // --- ChunkServer --------------------------------------------------------------

  /** Answers FROM's want: the request travels, the answer (or the chunk, uncompressed) comes back. */
  async serve (from: Node, chunk: Chunk, ask: { fetch: boolean, waitMs: number }, signal: AbortSignal): Promise<Reply> {
    await this.request(this.latency, signal)
    if (!this.alive) throw new PeerGone('connection refused')
    const active = this.serving.get(from.id) ?? 0
    if (active >= SERVER.maxConcurrentPerPeer) return await this.answer('busy', signal)
    this.serving.set(from.id, active + 1)
    try {
      const found = (this.bad && !chunk.catalog) || this.held.has(chunk.digest) || (ask.fetch && await this.ownerFetch(chunk, Math.min(ask.waitMs, SERVER.maxWaitMs)))
      // (ownerFetch says false when this node cannot or will not fetch it: dont-have, and the requester tries the next owner.)
      if (found === 'pending') return await this.answer('pending', signal)
      if (found !== true) return await this.answer('dont-have', signal)
      void this.cpu.work(this.w.p.cpuMsPerMB * chunk.length / 1e6) // sending costs the sender CPU too, which slows its own reads
      await from.receive(new Transfer(this.sim, this.up, from.down, chunk.length, this.transferOptions()), signal, false)
      this.result.uploadBytes += chunk.length
      return this.bad ? 'bad-data' : 'data'
    } finally {
      this.serving.set(from.id, (this.serving.get(from.id) ?? 1) - 1)
    }
  }

  /**
   * As the chunk's owner: fetch it through our own resolver (once for everybody),
   * or say `pending` when the wait runs out. Only for chunks our catalogs vouch
   * for, and at most 32 at a time (Peering's LocalChunks).
   */
  private async ownerFetch (chunk: Chunk, waitMs: number): Promise<boolean | 'pending'> {
    const vouched = chunk.catalog ? this.held.has(chunk.digest) : this.mounted
    if (!vouched || this.ownerFetchesInFlight >= SERVER.maxOwnerFetches) return false
    this.ownerFetchesInFlight++
    this.ownerFetches.set(chunk.digest, (this.ownerFetches.get(chunk.digest) ?? 0) + 1)
    const fetching = this.resolve(chunk)
    void fetching.finally(() => {
      this.ownerFetchesInFlight--
      const n = (this.ownerFetches.get(chunk.digest) ?? 1) - 1
      if (n === 0) this.ownerFetches.delete(chunk.digest)
      else this.ownerFetches.set(chunk.digest, n)
    })
    const expired = this.sim.sleep(waitMs).then(() => 'pending' as const)
    return await Promise.race([fetching, expired])
  }

  private async answer (reply: Reply, signal: AbortSignal): Promise<Reply> {
    await this.sim.sleep(this.latency, signal)
    return reply
  }
}

/** PROMISE, or a rejection with SIGNAL's reason as soon as it aborts. */
function abortable<T> (promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason)
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
  })
}

export interface ModelRun {
  result: ClusterResult
  events: number
  /** Wall-clock seconds the simulation took. */
  seconds: number
}

/** Runs one scenario in the model (peers, baseline, or a lone node) and reports it as a real run would be. */
export async function simulate (options: ModelOptions): Promise<ModelRun> {
  const started = performance.now()
  const w = new World(options)
  const { s, sim } = w
  const count = options.mode === 'lone' ? 1 : s.nodes
  const arrivals = options.mode === 'lone' ? [0] : arrivalTimes(s)
  const chunks = options.profile.chunks.map(c => w.chunk(c))
  const plan: MountPlan = {
    ...options.profile.metadata,
    catalogs: options.profile.catalogs.map(c => w.chunk({ digest: c.digest, pack: c.digest, length: c.size, storedLength: c.size }, true)),
    packs: options.profile.packs
  }
  const nodes = Array.from({ length: count }, (_, i) => new Node(w, i, false))
  const bad = w.peers && s.faults.badPeers !== undefined
    ? Array.from({ length: countOf(s.faults.badPeers.share, s.nodes) }, (_, i) => new Node(w, count + i, true))
    : []
  // Bad peers join before the burst and announce the image's packs (their records have landed when it starts).
  for (const b of bad) for (const pack of options.profile.packs) w.provide(pack, b)

  const events: ClusterResult['events'] = []
  if (options.mode !== 'lone' && s.faults.kill !== undefined) {
    const doomed = killedNodes(s).map(i => nodes[i]!)
    sim.at(s.faults.kill.atMs, () => {
      events.push({ tMs: sim.now, what: `kill -9 of ${doomed.length} agents` })
      for (const n of doomed) n.kill()
    })
  }
  if (options.mode !== 'lone' && s.faults.originOutage !== undefined) {
    const { fromMs, toMs } = s.faults.originOutage
    sim.at(fromMs, () => {
      events.push({ tMs: sim.now, what: 'origin stopped' })
      w.originAlive = false
      for (const t of [...w.origin.transfers]) t.abort(new PeerGone('origin stopped'))
    })
    sim.at(toMs, () => {
      events.push({ tMs: sim.now, what: 'origin restarted' })
      w.originAlive = true
    })
  }

  const samples: OriginSample[] = []
  const sample = (): void => {
    samples.push({ tMs: sim.now, bytesSent: w.origin.bytes, requests: w.originStats.requests })
    sim.at(sim.now + SAMPLE_MS, sample)
  }
  sample()
  // libp2p's own upkeep (DHT table refresh, identify, pings, the peer store) costs each node CPU all the time.
  const upkeep = w.p.upkeepMsPerPeer * Math.min(20, s.nodes - 1)
  if (w.peers && upkeep > 0) {
    const tick = (n: Node): void => {
      if (!n.alive) return
      void n.cpuWork(upkeep)
      sim.at(sim.now + 1000, () => tick(n))
    }
    for (const n of [...nodes, ...bad]) tick(n)
  }

  let running = count
  for (const [i, n] of nodes.entries()) {
    n.result.arrivalMs = arrivals[i]!
    sim.at(arrivals[i]!, () => {
      if (!n.alive) return
      void n.runWorkload(chunks, plan).finally(() => { if (--running === 0) sim.stop() })
    })
  }
  sim.at(s.timeouts.runMs, () => sim.stop())
  await sim.run()
  for (const n of nodes) {
    if (n.result.startedMs === undefined || n.result.outcome !== 'not-started') continue
    n.result.outcome = 'failed'
    n.result.error = 'still running when the run bound (timeouts.runMs) passed'
  }
  return {
    result: {
      mode: options.mode,
      nodes: nodes.map(n => n.result),
      origin: { bytesSent: w.origin.bytes, ...w.originStats, samples },
      badPeers: bad.map(b => ({ peerId: b.id, wants: 0, corrupted: b.result.uploadBytes > 0 ? 1 : 0, haves: 0 })),
      events,
      wallMs: sim.now,
      cpuBusy: 0,
      notes: []
    },
    events: sim.events,
    seconds: (performance.now() - started) / 1000
  }
}
