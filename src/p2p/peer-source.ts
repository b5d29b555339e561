import type { PeerId } from '@libp2p/interface'
import type { ChunkSource } from '../fetch/chunk-source.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import type { PeerBans } from './bans.ts'
import { systemClock, type Clock } from '../util/clock.ts'
import type { ChunkRequester } from './chunk-client.ts'
import { MAX_CHUNK_BYTES, normalizeRanges, rangesCover, type ByteRange } from './chunk-protocol.ts'
import { ProtocolViolationError } from './errors.ts'
import type { PackRouter } from './pack-router.ts'
import { DEFAULT_CHUNK_TIMEOUT_MS, PEER_SOURCE_DEFAULTS, peerBudgetMs, type Settings } from './peer-source-defaults.ts'
import { chunkKey, LARGE_SWARM, nodeKey, selectSources, spreadKey, topNodes, type NodeKey, type Selection } from './rendezvous.ts'

export interface PeerChunkSourceOptions extends Partial<Record<keyof typeof PEER_SOURCE_DEFAULTS, number>> {
  self: PeerId
  router: PackRouter
  client: ChunkRequester
  /** Shared with the node's connection gater (createPeerNode's `bans`). */
  bans: PeerBans
  /**
   * The DHT key whose providers form a pack's swarm. The agent groups packs by
   * layer (and an image's metadata under its manifest), so a mount provides and
   * walks a few keys instead of one per pack: DHT traffic was most of a burst's
   * CPU. Default: the pack itself.
   */
  swarmOf?: (pack: Digest) => Digest
  /** Default: the system clock. The simulation model passes simulated time. */
  clock?: Clock
  /** Whether bytes a peer sent are the chunk. Default: length and SHA-256 (the model, which moves no bytes, swaps it). */
  verify?: (chunk: ChunkRef, bytes: Uint8Array) => boolean
  /** Default: the source's own. The simulation model shares one among its thousands of sources. */
  keys?: PeerKeys
  /**
   * How late this node's event loop runs now, in ms (EventLoopLag.recentMs), added
   * to every peer deadline and to the get's budget: a CPU-starved node reads
   * answers late and its peers, as starved, send them late. Default: 0.
   */
  lag?: () => number
  /** The resolver's chunk timeout (ChunkResolver timeoutMs), which bounds every get. Default 20 s. */
  chunkTimeoutMs?: number
  /**
   * The peers this node has a connection to (libp2p's getPeers): a root waits only
   * while one of them that has not joined the swarm would outrank it (rootWaitMs).
   * Default: none, so a root never waits.
   */
  connected?: () => readonly PeerId[]
}

export interface PeerSourceStats {
  /** Chunks returned, verified. */
  hits: number
  /** `get` calls that returned undefined (the resolver then goes to the origin). */
  misses: number
  /** Of the misses, small whole blobs of a small swarm sent to the origin without asking peers (directBlobBytes). */
  direct: number
  /** Misses where this node was the chunk's root (nobody but banned peers outranks it): the origin by design. */
  roots: number
  bytesFromPeers: number
  /** Verified bytes received, by peer id. */
  perPeerBytes: Map<string, number>
  /** Chunks that failed length or SHA-256 (each one bans its sender). */
  verificationFailures: number
  /** Streams that broke the protocol (each one bans its sender). */
  protocolViolations: number
  /** Ban events. */
  bans: number
  /** Distinct peers ever banned. */
  badPeers: number
  /** Requests to a parent (which fetches the chunk if it lacks it). */
  parentRequests: number
  hedges: number
  /** Requests that outlived their deadline: to holders, and to parents. */
  timeouts: number
  parentTimeouts: number
  /** Misses because the get's budget ran out (parents kept us waiting). */
  outOfTime: number
  busy: number
  dontHave: number
  pending: number
}

/** A swarm member: its rendezvous hash words and its libp2p id. */
export interface Peer extends NodeKey { readonly peer: PeerId }

/**
 * Peers' rendezvous keys, hashed once per peer, and router answers turned into
 * keys once per answer (the router hands out the same array until the swarm
 * changes; a source asks for every chunk, a big swarm has a thousand members).
 */
export class PeerKeys {
  private readonly peers = new Map<string, Peer>()
  private readonly answers = new WeakMap<readonly PeerId[], readonly Peer[]>()

  of (peer: PeerId): Peer {
    const id = peer.toString()
    let key = this.peers.get(id)
    if (key === undefined) {
      key = { ...nodeKey(id), peer }
      this.peers.set(id, key)
    }
    return key
  }

  ofAnswer (answer: readonly PeerId[]): readonly Peer[] {
    let keys = this.answers.get(answer)
    if (keys === undefined) {
      keys = answer.map(peer => this.of(peer))
      this.answers.set(answer, keys)
    }
    return keys
  }
}


/**
 * Chunks from other nodes, never unverified. For a chunk it:
 *  1. gets the pack's swarm (everyone who announced it) from the router, and
 *     availability (who holds which ranges) from a few swarm peers; both are
 *     waited for only the first time, then refreshed in the background;
 *  2. races the known holders, in this node's spread order, hedging to a
 *     second holder when the first is slow and moving on at once on busy or
 *     dont-have;
 *  3. otherwise asks a parent in the chunk's distribution tree (a node that
 *     outranks it for this chunk, see `selectSources`), which fetches the chunk
 *     the same way if it lacks it and answers when it lands, or `pending` while
 *     its fetch runs; a dead or failing parent is replaced by another;
 *  4. returns undefined when this node is the chunk's root, or nobody answered
 *     in time, so the resolver fetches from the origin.
 * A peer whose bytes fail verification is banned and disconnected, and the
 * chunk is tried elsewhere.
 */
export class PeerChunkSource implements ChunkSource {
  readonly name = 'peers'
  readonly stats: PeerSourceStats = {
    hits: 0, misses: 0, direct: 0, roots: 0, bytesFromPeers: 0, perPeerBytes: new Map(), verificationFailures: 0, protocolViolations: 0,
    bans: 0, badPeers: 0, parentRequests: 0, hedges: 0, timeouts: 0, parentTimeouts: 0, outOfTime: 0, busy: 0, dontHave: 0, pending: 0
  }

  private readonly self: Peer
  private readonly router: PackRouter
  private readonly client: ChunkRequester
  private readonly bans: PeerBans
  private readonly clock: Clock
  private readonly verify: (chunk: ChunkRef, bytes: Uint8Array) => boolean
  private readonly swarmOf: (pack: Digest) => Digest
  private readonly settings: Settings
  private readonly availability: Availability
  private readonly keys: PeerKeys
  private readonly lag: () => number
  private readonly budgetMs: number
  private readonly suspects = new Map<string, { until: number, failures: number }>()
  private readonly everBanned = new Set<string>()
  private readonly haveQueries = new Map<string, Promise<void>>()
  /** Parents being asked, per chunk digest (see isAsking). */
  private readonly asking = new Map<Digest, Set<string>>()
  /** When this source first looked at each swarm (see rootWaitMs). */
  private readonly firstLooked = new Map<Digest, number>()
  private readonly connected: () => readonly PeerId[]

  constructor (options: PeerChunkSourceOptions) {
    const { self, router, client, bans, clock, verify, swarmOf, keys, lag, chunkTimeoutMs, connected, ...settings } = options
    this.settings = { ...PEER_SOURCE_DEFAULTS, ...settings }
    this.budgetMs = peerBudgetMs(chunkTimeoutMs ?? DEFAULT_CHUNK_TIMEOUT_MS, this.settings)
    this.clock = clock ?? systemClock
    this.keys = keys ?? new PeerKeys()
    const allowance = this.settings.maxLagAllowanceMs
    this.lag = lag !== undefined ? () => Math.min(allowance, lag()) : () => 0
    this.self = this.keys.of(self)
    this.router = router
    this.client = client
    this.bans = bans
    this.verify = verify ?? ((chunk, bytes) => bytes.length === chunk.length && sha256(bytes) === chunk.digest)
    this.swarmOf = swarmOf ?? (pack => pack)
    this.connected = connected ?? (() => [])
    this.availability = new Availability(this.settings.availabilityTtlMs, this.clock)
  }

  /**
   * Verified bytes from a peer, or undefined when no peer had them within
   * `maxWaitMs` (longer while a parent reports progress, never past peerBudgetMs),
   * or this node is the chunk's root. Rejects only when the caller's signal aborts.
   */
  async get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined> {
    options.signal.throwIfAborted()
    if (chunk.length > MAX_CHUNK_BYTES) {
      // Larger than the protocol carries (the format's chunks are far smaller): the origin's job.
      this.stats.misses++
      return undefined
    }
    // A starved node and a big chunk get more time, within the bound that leaves the origin its try.
    const slack = Math.min(this.settings.maxLagAllowanceMs, this.lag() + this.transferMs(chunk))
    const budget = new Budget(this.clock, Math.min(this.budgetMs, this.settings.maxWaitMs + slack), Math.min(this.budgetMs, this.settings.maxPendingWaitMs + slack))
    const signal = AbortSignal.any([options.signal, budget.signal])
    let bytes: Uint8Array | undefined
    try {
      bytes = await this.find(chunk, signal, budget)
    } catch (err) {
      if (!signal.aborted) throw err
    } finally {
      budget.close()
    }
    options.signal.throwIfAborted()
    if (bytes !== undefined) this.stats.hits++
    else {
      this.stats.misses++
      if (budget.signal.aborted) this.stats.outOfTime++
    }
    return bytes
  }

  private async find (chunk: ChunkRef, signal: AbortSignal, budget: Budget): Promise<Uint8Array | undefined> {
    const group = this.swarmOf(chunk.pack)
    let swarm = await this.swarm(group, signal)
    if (chunk.pack === chunk.digest && chunk.length <= this.settings.directBlobBytes && swarm.length < this.settings.directBlobMaxSwarm) {
      this.stats.direct++
      return undefined
    }
    const answers = this.refreshAvailability(chunk.pack, swarm)
    // A whole blob (a catalog) is read once per mount, and early holders are worth finding: its
    // parents are often nodes whose mounts lag behind, which keep it waiting or fail it to the origin.
    if (answers !== undefined && chunk.pack === chunk.digest) await this.firstAnswers(answers, signal)
    let selection = this.select(chunk, swarm, group)
    if (selection.isRoot) ({ swarm, selection } = await this.rootWait(chunk, group, swarm, selection, signal))
    const asked = new Set<string>()
    if (selection.holders.length > 0) {
      for (const holder of selection.holders) asked.add(holder.id)
      const bytes = await this.fromHolders(selection.holders, chunk, signal)
      if (bytes !== undefined) return bytes
    }
    if (!selection.isRoot) {
      for (const parent of selection.parents) {
        const bytes = await this.fromParent(parent, chunk, signal, budget)
        if (bytes !== undefined) return bytes
      }
    }
    if (answers !== undefined) {
      // About to go to the origin (a root, or every parent failed): first hear the pack's first
      // availability answers, if they were still out, and ask the holders they name.
      await this.firstAnswers(answers, signal)
      const holders = this.select(chunk, swarm, group).holders.filter(h => !asked.has(h.id))
      const bytes = holders.length > 0 ? await this.fromHolders(holders, chunk, signal) : undefined
      if (bytes !== undefined) return bytes
    }
    if (!selection.isRoot) return undefined // every parent failed: the origin
    // A swarm still forming changes its top: the root before us may have the chunk already.
    const bytes = selection.runnersUp.length > 0 ? await this.fromHolders(selection.runnersUp, chunk, signal) : undefined
    if (bytes !== undefined) return bytes
    this.stats.roots++
    return undefined
  }

  /**
   * A root (SELECTION over SWARM) waits, up to rootWaitMs after its first look at
   * the swarm, while a peer it is connected to but has not heard join would outrank
   * it (in a burst it joins in a moment). Returns the swarm and the selection when
   * the wait ends.
   */
  private async rootWait (chunk: ChunkRef, group: Digest, swarm: readonly Peer[], selection: Selection<Peer>, signal: AbortSignal): Promise<{ swarm: readonly Peer[], selection: Selection<Peer> }> {
    for (;;) {
      const left = this.settings.rootWaitMs - (this.clock.now() - this.firstLooked.get(group)!)
      if (left <= 0 || !selection.isRoot || !this.mayBeOutranked(chunk, group, swarm)) return { swarm, selection }
      await this.clock.sleep(Math.min(left, this.settings.rootPollMs), signal)
      swarm = await this.swarm(group, signal)
      selection = this.select(chunk, swarm, group)
    }
  }

  /** Whether a peer this node is connected to, but has not heard join the swarm, would outrank it for CHUNK (for a pack's chunk, in a small swarm only: rootWaitMaxSwarm). */
  private mayBeOutranked (chunk: ChunkRef, group: Digest, swarm: readonly Peer[]): boolean {
    if (chunk.pack !== chunk.digest && swarm.length + 1 >= this.settings.rootWaitMaxSwarm) return false
    const members = new Set(swarm.map(p => p.id))
    const outside = this.connected().filter(p => !members.has(p.toString())).map(p => this.keys.of(p))
    return outside.length > 0 && !this.select(chunk, [...swarm, ...outside], group).isRoot
  }

  private select (chunk: ChunkRef, swarm: readonly Peer[], group: Digest): Selection<Peer> {
    return selectSources({
      key: chunkKey(chunk.digest),
      self: this.self,
      swarm,
      holders: this.availability.holders(chunk),
      excluded: id => this.bans.isBanned(id),
      suspect: id => this.suspected(id),
      maxParents: this.settings.maxParents,
      maxHolders: this.settings.maxHolders,
      ...(swarm.length + 1 >= LARGE_SWARM ? { group: chunkKey(group) } : {})
    })
  }

  /** The router's answer; while the pack's first lookup runs, what it found within `lookupWaitMs`. */
  private async swarm (key: Digest, signal: AbortSignal): Promise<readonly Peer[]> {
    if (!this.firstLooked.has(key)) this.firstLooked.set(key, this.clock.now())
    if (!this.router.answer(key).settled) {
      try {
        await this.router.settled(key, { signal: AbortSignal.any([signal, this.clock.timeout(this.settings.lookupWaitMs)]) })
      } catch (err) {
        if (signal.aborted) throw err
      }
    }
    // The same array until the swarm changes: hashed once, not for every chunk.
    return this.keys.ofAnswer(this.router.answer(key).peers)
  }

  /**
   * Asks a stable sample of the swarm which ranges of the pack they hold when
   * their answers are stale, in the background: stale answers serve while fresh
   * ones come. Returns the queries when nobody has answered for the pack yet (a
   * node about to go to the origin, and a whole blob's read, wait for them:
   * `firstAnswers`), else undefined.
   *
   * Reads used to wait for a pack's first answers whatever their place in the
   * tree: up to a peer deadline (0.5-1 s on starved agents) on every pack's first
   * read, for answers that in a burst say nobody holds anything yet; a parent that
   * holds the chunk answers the request anyway.
   */
  private refreshAvailability (pack: Digest, swarm: readonly Peer[]): Array<Promise<void>> | undefined {
    const sample = topNodes(spreadKey(chunkKey(pack), this.self), swarm, this.settings.availabilitySample, p => p.id === this.self.id || this.bans.isBanned(p.id) || this.suspected(p.id))
    const queries = sample.filter(p => !this.availability.fresh(pack, p.id)).map(p => this.queryHave(pack, p))
    return queries.length === 0 || this.availability.answered(pack) ? undefined : queries
  }

  /** Waits for availability QUERIES to settle, at most one peer deadline (a dead peer in the sample must not stall reads). */
  private async firstAnswers (queries: Array<Promise<void>>, signal: AbortSignal): Promise<void> {
    const wait = AbortSignal.any([signal, this.clock.timeout(this.peerDeadlineMs())])
    await new Promise<void>(resolve => {
      const stop = (): void => resolve()
      wait.addEventListener('abort', stop, { once: true })
      void Promise.allSettled(queries).then(() => {
        wait.removeEventListener('abort', stop)
        resolve()
      })
    })
    signal.throwIfAborted()
  }

  /** One availability query per (pack, peer) at a time, shared by every caller. */
  private queryHave (pack: Digest, peer: Peer): Promise<void> {
    const key = `${pack} ${peer.id}`
    let query = this.haveQueries.get(key)
    if (query === undefined) {
      const deadline = this.clock.timeout(this.peerDeadlineMs())
      query = this.client.have(peer.peer, pack, { signal: deadline })
        .then(ranges => {
          this.healthy(peer)
          this.availability.set(pack, peer, ranges)
        }, err => {
          // A late availability answer is no sign of a dead peer (a starved one answers late); only failures are.
          if (!deadline.aborted) this.failed(peer, err)
        })
        .finally(() => this.haveQueries.delete(key))
      this.haveQueries.set(key, query)
    }
    return query
  }

  /**
   * At most two holders in flight: the next one starts when one fails (at
   * once) or when the running one is slower than `hedgeDelayMs`. The first
   * verified answer wins and the others are cancelled.
   */
  private async fromHolders (holders: Peer[], chunk: ChunkRef, signal: AbortSignal): Promise<Uint8Array | undefined> {
    const done = new AbortController()
    const scope = AbortSignal.any([signal, done.signal])
    const running = new Map<Peer, Promise<{ peer: Peer, bytes: Uint8Array | undefined }>>()
    let next = 0
    const launch = (): void => {
      const peer = holders[next++]!
      running.set(peer, this.attempt(peer, chunk, { fetch: false, waitMs: 0 }, scope)
        .then(result => ({ peer, bytes: result === 'pending' ? undefined : result })))
    }
    try {
      launch()
      while (running.size > 0) {
        const canHedge = next < holders.length && running.size < 2
        const timer = new AbortController()
        const hedge = canHedge
          ? this.clock.sleep(this.settings.hedgeDelayMs + this.lag() + this.transferMs(chunk), AbortSignal.any([timer.signal, scope])).then(() => 'hedge' as const, () => 'stop' as const)
          : undefined
        const contenders: Array<Promise<'hedge' | 'stop' | { peer: Peer, bytes: Uint8Array | undefined }>> = [...running.values()]
        if (hedge !== undefined) contenders.push(hedge)
        const first = await Promise.race(contenders)
        timer.abort()
        if (first === 'stop') return undefined // our caller gave up
        if (first === 'hedge') {
          this.stats.hedges++
          launch()
          continue
        }
        running.delete(first.peer)
        if (first.bytes !== undefined) return first.bytes
        if (next < holders.length && running.size < 2) launch()
      }
      return undefined
    } finally {
      done.abort(ANOTHER_HOLDER)
    }
  }

  /**
   * Asks a parent to fetch the chunk and answer when it lands. `pending` means
   * its fetch is still running (the parent is alive and its chain is working),
   * so we ask again, and the get's budget is pushed back (up to maxPendingWaitMs).
   */
  private async fromParent (parent: Peer, chunk: ChunkRef, signal: AbortSignal, budget: Budget): Promise<Uint8Array | undefined> {
    this.stats.parentRequests++
    let asked = this.asking.get(chunk.digest)
    if (asked === undefined) this.asking.set(chunk.digest, asked = new Set())
    asked.add(parent.id)
    try {
      while (!signal.aborted) {
        const result = await this.attempt(parent, chunk, { fetch: true, waitMs: this.settings.parentWaitMs }, signal)
        if (result !== 'pending') return result
        budget.extend(this.settings.parentWaitMs + this.settings.parentGraceMs + this.peerDeadlineMs())
      }
      return undefined
    } finally {
      asked.delete(parent.id)
      if (asked.size === 0 && this.asking.get(chunk.digest) === asked) this.asking.delete(chunk.digest)
    }
  }

  /**
   * Whether this node is waiting on PEER, as its parent, for the chunk. If PEER
   * asks us for it as its parent, the two would wait on each other until their
   * budgets ran out: the server answers it dont-have instead, and it moves on.
   * Nodes whose views of a big swarm straddle LARGE_SWARM rank it differently
   * (rendezvous.ts); at 3,000 modelled nodes such pairs sent most chunks to the origin.
   */
  isAsking (digest: Digest, peer: string): boolean {
    return this.asking.get(digest)?.has(peer) === true
  }

  /** One request to one peer, with its own deadline. Never rejects: every failure is bookkept here. */
  private async attempt (peer: Peer, chunk: ChunkRef, ask: { fetch: boolean, waitMs: number }, signal: AbortSignal): Promise<Uint8Array | undefined | 'pending'> {
    const deadline = this.clock.timeout(ask.waitMs + (ask.fetch ? this.settings.parentGraceMs : 0) + this.peerDeadlineMs() + this.transferMs(chunk))
    let reply
    try {
      reply = await this.client.want(peer.peer, chunk, { ...ask, signal: AbortSignal.any([signal, deadline]) })
    } catch (err) {
      if (signal.aborted) return undefined // we stopped waiting; not the peer's fault
      if (deadline.aborted) {
        this.stats.timeouts++
        if (ask.fetch) this.stats.parentTimeouts++
      }
      this.failed(peer, err)
      return undefined
    }
    this.healthy(peer)
    switch (reply.status) {
      case 'data':
        return this.accept(peer, chunk, reply.bytes)
      case 'dont-have':
        this.stats.dontHave++
        this.availability.forget(chunk.pack, peer.id)
        return undefined
      case 'busy':
        this.stats.busy++
        return undefined
      case 'pending':
        this.stats.pending++
        return 'pending'
    }
  }

  private accept (peer: Peer, chunk: ChunkRef, bytes: Uint8Array): Uint8Array | undefined {
    if (!this.verify(chunk, bytes)) {
      this.stats.verificationFailures++
      this.ban(peer)
      return undefined
    }
    this.stats.bytesFromPeers += chunk.length
    this.stats.perPeerBytes.set(peer.id, (this.stats.perPeerBytes.get(peer.id) ?? 0) + chunk.length)
    this.availability.noteHolds(chunk.pack, peer, { offset: chunk.packOffset, length: chunk.storedLength })
    return bytes
  }

  private ban (peer: Peer): void {
    if (!this.bans.isBanned(peer.id)) {
      this.bans.ban(peer.id, this.settings.banMs)
      this.stats.bans++
      this.everBanned.add(peer.id)
      this.stats.badPeers = this.everBanned.size
    }
    this.availability.forgetPeer(peer.id)
    void this.client.disconnect(peer.peer).catch(() => {})
  }

  /** A peer that broke the protocol is banned; one that was slow or unreachable is only skipped for a while. */
  private failed (peer: Peer, err: unknown): void {
    if (err instanceof ProtocolViolationError) {
      // every request in flight on the broken stream fails with the same error: count it once
      if (!this.bans.isBanned(peer.id)) this.stats.protocolViolations++
      this.ban(peer)
      return
    }
    const failures = (this.suspects.get(peer.id)?.failures ?? 0) + 1
    const ms = Math.min(this.settings.banMs, this.settings.suspectMs * 2 ** (failures - 1))
    this.suspects.set(peer.id, { until: this.clock.now() + ms, failures })
  }

  /** A peer's deadline for an answer, allowing for our own event loop's delay. */
  private peerDeadlineMs (): number {
    return this.settings.peerTimeoutMs + this.lag()
  }

  /** Time allowed for the chunk's bytes to arrive, at the slowest rate we accept. */
  private transferMs (chunk: ChunkRef): number {
    return Math.ceil(1000 * chunk.storedLength / this.settings.slowPeerBytesPerSecond)
  }

  private healthy (peer: Peer): void {
    this.suspects.delete(peer.id)
  }

  private suspected (id: string): boolean {
    return (this.suspects.get(id)?.until ?? 0) > this.clock.now()
  }
}

/** Abort reasons made once: an abort without one builds a DOMException (a tenth of a 10,000-node model's time went there). */
const DONE = new Error('done')
const OUT_OF_TIME = new Error('no peer answered in time')
const ANOTHER_HOLDER = new Error('another holder answered')

/** A get's deadline: `ms` from its start, pushed back while a parent reports progress, never past `hardMs`. */
class Budget {
  readonly signal: AbortSignal
  private readonly controller = new AbortController()
  private readonly closed = new AbortController()
  private readonly clock: Clock
  private readonly hard: number
  private deadline: number

  constructor (clock: Clock, ms: number, hardMs: number) {
    this.clock = clock
    this.signal = this.controller.signal
    this.deadline = clock.now() + ms
    this.hard = clock.now() + Math.max(ms, hardMs)
    this.arm()
  }

  extend (ms: number): void {
    this.deadline = Math.min(this.hard, Math.max(this.deadline, this.clock.now() + ms))
  }

  close (): void {
    this.closed.abort(DONE)
  }

  private arm (): void {
    this.clock.sleep(Math.max(0, this.deadline - this.clock.now()), this.closed.signal).then(() => {
      if (this.clock.now() >= this.deadline) this.controller.abort(OUT_OF_TIME)
      else this.arm()
    }, () => {})
  }
}

interface Holding {
  peer: Peer
  ranges: ByteRange[]
  expires: number
  /** From a full availability answer (not just chunks it happened to send us). */
  complete: boolean
}

/** Who holds which ranges of which pack, as peers told us (HAVE) or showed us (data). */
class Availability {
  private readonly packs = new Map<Digest, Map<string, Holding>>()
  /** Packs some peer has answered a HAVE for: from then on, reads stop waiting for answers. */
  private readonly answeredPacks = new Set<Digest>()
  private readonly ttlMs: number
  private readonly clock: Clock

  constructor (ttlMs: number, clock: Clock) {
    this.ttlMs = ttlMs
    this.clock = clock
  }

  set (pack: Digest, peer: Peer, ranges: ByteRange[]): void {
    this.answeredPacks.add(pack)
    this.holdings(pack).set(peer.id, { peer, ranges, expires: this.now() + this.ttlMs, complete: true })
  }

  answered (pack: Digest): boolean {
    return this.answeredPacks.has(pack)
  }

  /** A peer just sent us this range's chunk, verified: it holds it, whatever its last answer said. */
  noteHolds (pack: Digest, peer: Peer, range: ByteRange): void {
    const holdings = this.holdings(pack)
    const current = holdings.get(peer.id)
    if (current !== undefined && current.expires > this.now()) {
      current.ranges = normalizeRanges([...current.ranges, range])
    } else {
      holdings.set(peer.id, { peer, ranges: [range], expires: this.now() + this.ttlMs, complete: false })
    }
  }

  fresh (pack: Digest, id: string): boolean {
    const holding = this.packs.get(pack)?.get(id)
    return holding !== undefined && holding.complete && holding.expires > this.now()
  }

  holders (chunk: ChunkRef): Peer[] {
    const holdings = this.packs.get(chunk.pack)
    if (holdings === undefined) return []
    const now = this.now()
    const found: Peer[] = []
    for (const [id, holding] of holdings) {
      if (holding.expires <= now) holdings.delete(id)
      else if (rangesCover(holding.ranges, chunk.packOffset, chunk.storedLength)) found.push(holding.peer)
    }
    if (holdings.size === 0) this.packs.delete(chunk.pack)
    return found
  }

  forget (pack: Digest, id: string): void {
    this.packs.get(pack)?.delete(id)
  }

  forgetPeer (id: string): void {
    for (const holdings of this.packs.values()) holdings.delete(id)
  }

  private now (): number {
    return this.clock.now()
  }

  private holdings (pack: Digest): Map<string, Holding> {
    let holdings = this.packs.get(pack)
    if (holdings === undefined) {
      holdings = new Map()
      this.packs.set(pack, holdings)
    }
    return holdings
  }
}
