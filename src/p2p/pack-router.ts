import type { PeerId } from '@libp2p/interface'
import type { Libp2p } from 'libp2p'
import { digestToBytes, type Digest } from '../oci/digest.ts'
import { AnnounceError } from './errors.ts'
import { CID, createMultihash } from './libp2p.ts'
import type { SwarmMembers } from './swarm-members.ts'
import { abortable, sleep } from '../util/limit.ts'

/** A pack's swarm as a node knows it at a moment. */
export interface SwarmAnswer {
  /** Everyone else known to have announced the pack (holders and wanters): members that told us, then the DHT's finds. */
  readonly peers: readonly PeerId[]
  /**
   * False while the pack's first lookup runs and nobody has told us of themselves
   * (JOIN, peer exchange): `peers` is what is known so far.
   */
  readonly settled: boolean
}

/** Who else is in a pack's swarm: DHT provider records plus live availability. */
export interface PackRouter {
  /** Tell the swarm this node wants (and will soon hold) the pack. */
  announce (pack: Digest, options: { signal: AbortSignal }): Promise<void>
  /**
   * The swarm as known now, without waiting (a stale answer starts a new lookup
   * in the background). The same `peers` array until it changes, so callers may
   * cache what they derive from it: a peer source asks for every chunk, and a
   * big swarm has a thousand members.
   */
  answer (pack: Digest): SwarmAnswer
  /** Resolves once the pack's answer is settled (its first lookup ended); rejects with the signal's reason. */
  settled (pack: Digest, options: { signal: AbortSignal }): Promise<void>
}

export interface DhtPackRouterOptions {
  /**
   * How long a finished lookup is fresh. After that the next caller still gets it at
   * once while a new walk runs. Walks cost every DHT node they touch CPU (a burst's
   * agents spent most of theirs on them at 5 s), and members that join push
   * themselves (JOIN), so this is long. Default 30000.
   */
  cacheTtlMs?: number
  /** Members that told us directly (JOIN): part of every answer, and with any known a read does not wait for a walk. */
  members?: SwarmMembers
  /** Deadline of one findProviders walk; what was found by then is the answer. Default 5000. */
  lookupTimeoutMs?: number
  /** Wait before a pack's first provide (a function, for jitter). Default none. */
  provideDelayMs?: () => number
  /** Deadline of one provide. Default 15000. */
  provideTimeoutMs?: number
  /** While a pack is held, a failed announce is retried this often. Default 30000. */
  retryAnnounceMs?: number
  now?: () => number
}

export interface DhtPackRouterStats {
  provides: number
  provideFailures: number
  /** findProviders walks started. */
  lookups: number
  /** holders() calls answered by a cached or in-flight walk. */
  lookupsShared: number
  /** First walks not started because members had told us of themselves (see `lookup`). */
  lookupsSkipped: number
  /** First walks ended early when members told us of themselves (see `walk`). */
  lookupsStopped: number
}

type Routing = Pick<Libp2p, 'peerId' | 'contentRouting'>

const NOBODY: readonly PeerId[] = Object.freeze([])

export const PACK_ROUTER_DEFAULTS = {
  /** How long a walk that found nobody is reused. */
  emptyAnswerTtlMs: 1000,
  /**
   * The agent's first DHT provide of a key waits between these (ms, uniformly): a
   * burst's members find each other by JOIN within seconds, and provides landing
   * mid-burst cost every node CPU it needed for its reads (issue 14).
   */
  provideDelayMs: { min: 60_000, max: 90_000 }
} as const

/** raw binary: a pack is an opaque blob */
const RAW_CODEC = 0x55
const SHA2_256 = 0x12

/** The DHT key of a pack: a CIDv1 over the pack's own SHA-256 (multihash 0x12). */
export function packCid (pack: Digest): CID {
  return CID.createV1(RAW_CODEC, createMultihash(SHA2_256, digestToBytes(pack)))
}

/**
 * A PackRouter over kad-dht provider records, one record per pack (DESIGN:
 * "advertise coarse": a provide costs a lookup and ~20 RPCs, so never per chunk).
 *
 * - announce: provides once per pack while held; the DHT's reprovider keeps
 *   the record alive after that (node.ts sets its validity and interval), and
 *   a failed provide (e.g. no peers yet) is retried on a timer.
 * - holders: one findProviders walk per pack at a time (singleflight), fresh
 *   for `cacheTtlMs`; callers that arrive during the first walk see what has
 *   been found so far at once and the rest as it comes; once a walk has
 *   finished, later walks run in the background and callers get the last
 *   answer at once.
 *
 * Note: kad-dht's findProviders stops once it has k (20) providers, but a remote
 * record holder's answer lists every provider it holds, in one batch; only a
 * node that holds the key's records itself answers from its own store, cut to 20.
 */
export class DhtPackRouter implements PackRouter {
  readonly stats: DhtPackRouterStats = { provides: 0, provideFailures: 0, lookups: 0, lookupsShared: 0, lookupsSkipped: 0, lookupsStopped: 0 }
  private readonly routing: Routing
  private readonly cacheTtlMs: number
  private readonly lookupTimeoutMs: number
  private readonly provideTimeoutMs: number
  private readonly provideDelayMs: () => number
  private readonly retryAnnounceMs: number
  private readonly now: () => number
  private readonly members: SwarmMembers | undefined
  private readonly held = new Map<Digest, Announcement>()
  private readonly lookups = new Map<Digest, Lookup>()
  /** The last answer per pack and what it was made of (a first walk's `found` grows in place, hence its size). */
  private readonly answers = new Map<Digest, { heard: readonly PeerId[], walked: readonly PeerId[], size: number, answer: SwarmAnswer }>()
  private readonly stopping = new AbortController()

  constructor (routing: Routing, options: DhtPackRouterOptions = {}) {
    this.routing = routing
    this.cacheTtlMs = options.cacheTtlMs ?? 30_000
    this.lookupTimeoutMs = options.lookupTimeoutMs ?? 5000
    this.provideTimeoutMs = options.provideTimeoutMs ?? 15_000
    this.provideDelayMs = options.provideDelayMs ?? (() => 0)
    this.retryAnnounceMs = options.retryAnnounceMs ?? 30_000
    this.now = options.now ?? Date.now
    this.members = options.members
  }

  /**
   * Resolves once the provider record is out. Rejects with AnnounceError if
   * that failed; the router keeps retrying in the background regardless, so
   * callers may treat the announce as fire-and-forget.
   */
  async announce (pack: Digest, options: { signal: AbortSignal }): Promise<void> {
    let announcement = this.held.get(pack)
    if (announcement === undefined) {
      announcement = { done: false, delayMs: this.provideDelayMs(), inFlight: undefined, retry: undefined }
      this.held.set(pack, announcement)
    }
    if (announcement.done) return
    if (announcement.inFlight === undefined) {
      clearTimeout(announcement.retry) // this attempt replaces the scheduled retry
      announcement.inFlight = this.provide(pack, announcement)
    }
    await abortable(announcement.inFlight, options.signal)
  }

  /** Stop re-providing the pack (the agent evicted it); the records expire on their own. */
  async withdraw (pack: Digest, options: { signal: AbortSignal }): Promise<void> {
    const announcement = this.held.get(pack)
    if (announcement === undefined) return
    this.held.delete(pack)
    clearTimeout(announcement.retry)
    const signal = AbortSignal.any([options.signal, AbortSignal.timeout(this.provideTimeoutMs)])
    // A provide still in flight would publish after the cancel and be re-provided forever.
    await abortable(announcement.inFlight ?? Promise.resolve(), signal).catch(() => {})
    await this.routing.contentRouting.cancelReprovide(packCid(pack), { signal })
  }

  /**
   * Everyone else who announced the pack, as a stream: during the pack's first
   * walk, members as they tell us of themselves and the walk's finds as they
   * come, until the walk ends; after it, the last answer at once.
   */
  async * holders (pack: Digest, options: { signal: AbortSignal }): AsyncIterable<PeerId> {
    const { lookup, answer } = this.current(pack)
    if (answer.settled) {
      yield * answer.peers
      return
    }
    const seen = new Set<string>()
    const fresh = function * (peers: Iterable<PeerId>): Iterable<PeerId> {
      for (const peer of peers) {
        const id = peer.toString()
        if (!seen.has(id)) {
          seen.add(id)
          yield peer
        }
      }
    }
    let next = 0
    while (true) {
      yield * fresh(this.members?.of(pack) ?? [])
      while (next < lookup.found.length) yield * fresh([lookup.found[next++]!])
      if (lookup.done) return
      const changes = [lookup.changed(options.signal)]
      if (this.members !== undefined) changes.push(this.members.changed(pack, options.signal))
      await Promise.race(changes)
    }
  }

  answer (pack: Digest): SwarmAnswer {
    return this.current(pack).answer
  }

  async settled (pack: Digest, options: { signal: AbortSignal }): Promise<void> {
    for (;;) {
      const { lookup, answer } = this.current(pack)
      if (answer.settled) return
      const changes = [lookup.changed(options.signal)]
      if (this.members !== undefined) changes.push(this.members.changed(pack, options.signal))
      await Promise.race(changes)
    }
  }

  /** Ends background retries and walks in progress. */
  stop (): void {
    this.stopping.abort(new Error('pack router stopped'))
    for (const announcement of this.held.values()) clearTimeout(announcement.retry)
  }

  private async provide (pack: Digest, announcement: Announcement): Promise<void> {
    let signal = this.stopping.signal
    try {
      if (announcement.delayMs > 0) {
        await sleep(announcement.delayMs, this.stopping.signal)
        announcement.delayMs = 0
      }
      signal = AbortSignal.any([AbortSignal.timeout(this.provideTimeoutMs), this.stopping.signal])
      await this.routing.contentRouting.provide(packCid(pack), { signal })
      this.stats.provides++
      announcement.done = true
    } catch (err) {
      this.stats.provideFailures++
      if (this.held.get(pack) === announcement && !this.stopping.signal.aborted) {
        announcement.retry = setTimeout(() => {
          announcement.inFlight = this.provide(pack, announcement)
          announcement.inFlight.catch(() => {})
        }, this.retryAnnounceMs).unref()
      }
      const reason = signal.aborted ? `no answer within ${this.provideTimeoutMs} ms (are any peers connected?)` : (err as Error).message
      throw new AnnounceError(`pack ${pack}`, reason, { cause: err })
    } finally {
      announcement.inFlight = undefined
    }
  }

  /**
   * The pack's walk (see `lookup`) and the answer: members that told us of
   * themselves, then the last finished walk's finds (stale-while-revalidate: a
   * read does not wait for a walk when the last one answered), or during the
   * first walk, what it found so far. Settled once a walk has ended or members
   * told us of themselves (a burst's swarm is found by peer exchange in a round
   * trip, while the DHT's records come seconds later: every first read waited
   * the peer source's whole lookupWaitMs, 1.5 s, for a walk that found nothing).
   * Memoised on its inputs.
   */
  private current (pack: Digest): { lookup: Lookup, answer: SwarmAnswer } {
    const heard = this.members?.of(pack) ?? NOBODY
    const lookup = this.lookup(pack, heard.length > 0)
    const settled = lookup.done || lookup.previous !== undefined || heard.length > 0
    const walked = lookup.done ? lookup.found : lookup.previous ?? lookup.found
    let memo = this.answers.get(pack)
    if (memo?.heard !== heard || memo.walked !== walked || memo.size !== walked.length || memo.answer.settled !== settled) {
      const peers = new Map<string, PeerId>()
      for (const peer of [...heard, ...walked]) if (!peers.has(peer.toString())) peers.set(peer.toString(), peer)
      memo = { heard, walked, size: walked.length, answer: { peers: [...peers.values()], settled } }
      this.answers.set(pack, memo)
    }
    return { lookup, answer: memo.answer }
  }

  /**
   * The pack's current walk, or a new one when the last is stale (an empty one soon,
   * unless members told us of themselves). A pack's first walk is not made at all when
   * members have already told us of themselves: they are the swarm a walk would look
   * for, and a first walk in a burst asks every DHT peer for records that do not exist
   * yet (the first provide waits 60-90 s), so it costs every node CPU and finds nobody.
   * The walk comes `cacheTtlMs` later, as the usual refresh.
   */
  private lookup (pack: Digest, haveMembers: boolean): Lookup {
    const cached = this.lookups.get(pack)
    const expires = cached === undefined || cached.found.length > 0 || haveMembers ? cached?.expires : cached.emptyExpires
    if (cached !== undefined && expires! > this.now()) {
      this.stats.lookupsShared++
      return cached
    }
    for (const [key, old] of this.lookups) {
      if (old.expires <= this.now()) {
        this.lookups.delete(key)
        this.answers.delete(key)
      }
    }
    const lookup = new Lookup(cached?.found)
    this.lookups.set(pack, lookup)
    if (cached === undefined && haveMembers) {
      this.stats.lookupsSkipped++
      lookup.finish(this.now() + this.cacheTtlMs, this.now() + this.cacheTtlMs)
      return lookup
    }
    this.stats.lookups++
    void this.walk(pack, lookup)
    return lookup
  }

  /**
   * One findProviders walk into LOOKUP. A pack's first walk ends as soon as members
   * tell us of themselves (see `lookup`): in a burst they do within a round trip of our
   * JOIN, while the walk would go on asking every DHT peer.
   */
  private async walk (pack: Digest, lookup: Lookup): Promise<void> {
    const ended = new AbortController()
    const signal = AbortSignal.any([AbortSignal.timeout(this.lookupTimeoutMs), this.stopping.signal, ended.signal])
    let membersHeard = false
    if (lookup.previous === undefined && this.members !== undefined) {
      untilMembers(this.members, pack, signal).then(() => {
        membersHeard = true
        ended.abort()
      }, () => {})
    }
    try {
      for await (const provider of this.routing.contentRouting.findProviders(packCid(pack), { signal })) {
        if (!provider.id.equals(this.routing.peerId)) lookup.add(provider.id)
      }
    } catch {
      // Deadline, members heard, or no peers: the providers found so far are the answer until the cache expires.
    } finally {
      if (membersHeard) this.stats.lookupsStopped++
      ended.abort() // and with it the wait for members
      // An empty answer is retried sooner: in a burst the others' records may be a moment away.
      lookup.finish(this.now() + this.cacheTtlMs, this.now() + Math.min(this.cacheTtlMs, PACK_ROUTER_DEFAULTS.emptyAnswerTtlMs))
    }
  }
}

/** Resolves once some member of PACK's swarm has told us of itself; rejects when SIGNAL aborts. */
async function untilMembers (members: SwarmMembers, pack: Digest, signal: AbortSignal): Promise<void> {
  while (members.of(pack).length === 0) await members.changed(pack, signal)
}

interface Announcement {
  done: boolean
  /** Wait before the first provide. */
  delayMs: number
  inFlight: Promise<void> | undefined
  retry: NodeJS.Timeout | undefined
}

/** One findProviders walk, shared by every caller that asks while it runs or is cached. */
class Lookup {
  readonly found: PeerId[] = []
  private readonly ids = new Set<string>()
  /** The previous walk's answer, served while this one runs. */
  readonly previous: readonly PeerId[] | undefined
  done = false
  /** Infinity while running: a running walk is always reused. */
  expires = Infinity
  /** When an answer that found nobody goes stale. */
  emptyExpires = Infinity
  private waiters: Array<() => void> = []

  constructor (previous?: readonly PeerId[]) {
    this.previous = previous
  }

  add (peer: PeerId): void {
    const id = peer.toString()
    if (this.ids.has(id)) return
    this.ids.add(id)
    this.found.push(peer)
    this.notify()
  }

  finish (expires: number, emptyExpires: number): void {
    this.done = true
    this.expires = expires
    this.emptyExpires = emptyExpires
    this.notify()
  }

  changed (signal: AbortSignal): Promise<void> {
    return abortable(new Promise<void>(resolve => this.waiters.push(resolve)), signal)
  }

  private notify (): void {
    const waiters = this.waiters
    this.waiters = []
    for (const wake of waiters) wake()
  }
}
