import type { PeerId } from '@libp2p/interface'
import type { Digest } from '../oci/digest.ts'
import type { SwarmMember } from './chunk-protocol.ts'
import { chunkKey, inCore, nodeKey, type ChunkKey, type NodeKey } from './rendezvous.ts'

/** Members kept per swarm key; at a quarter more, the least recently heard are dropped down to it. */
const MAX_MEMBERS_PER_KEY = 1024
/** Ids heard last, per key, duplicates included: where `sample` looks first. */
const RECENT = 128
/** The most recently heard members a joiner hears of. */
const RECENT_MEMBERS = 32
/** Core members a joiner outside the core hears of (one in the core hears of all). */
const CORE_MEMBERS = 32
/**
 * Members told about each newcomer. Pushing to all was O(N^2) messages per
 * swarm; with 8, a member still hears of most newcomers through the several
 * seeds and peers it is connected to.
 */
const PASS_ON = 8

/** A view this big has parents enough: see `wantsMore`. */
const ENOUGH = 256

/** The peer exchange's numbers, for the simulation model's report. */
export const PEER_EXCHANGE = { maxMembersPerKey: MAX_MEMBERS_PER_KEY, recentMembers: RECENT_MEMBERS, coreMembers: CORE_MEMBERS, passOn: PASS_ON, enough: ENOUGH } as const

/**
 * Bounds on the swarms a node keeps for others: keys it has not joined itself
 * (`own`), heard of in peers' JOINs and MEMBERS. A seed passes members on for
 * swarms it is not in, so these are kept, but keys cost an attacker nothing:
 * 960k random keys in 30,000 JOINs took an agent from 542 to 1,434 MB, for good.
 */
export const FOREIGN_SWARM_LIMITS = {
  /** Foreign keys kept; beyond, the least recently heard of is forgotten. An image has a key per layer and one for its metadata. */
  maxKeys: 1024,
  /** Members kept over all foreign keys together (up to ~1 KB each with addresses): 50 swarms of the per-key maximum. */
  maxMembers: 65_536,
  /** A foreign key nobody mentioned for this long is forgotten (its burst is long over). */
  ttlMs: 10 * 60_000
} as const

interface Entry { peer: PeerId, addresses: readonly string[] }

/** One swarm key's members. */
class Swarm {
  readonly group: ChunkKey
  /** By id, least recently heard first (a re-heard member moves to the end). */
  readonly entries = new Map<string, Entry>()
  /** A ring of the ids heard last; `next` is where the next goes. */
  readonly recent: string[] = []
  next = 0
  /** `of`'s answer, until it is due for a rebuild (undefined), and how many core members it holds. */
  list: readonly PeerId[] | undefined
  listCore = 0
  /** Members in the swarm's core (rendezvous.ts `inCore`), in the order heard: never pruned. */
  readonly core = new Set<string>()
  waiters: Array<() => void> = []
  /** Whether this node joined the swarm itself (never forgotten), and when a foreign one was last mentioned. */
  own = false
  heardAt = 0

  constructor (key: Digest) {
    this.group = chunkKey(key)
  }
}

/**
 * Swarm members learnt from peers rather than from the DHT: those that told us
 * themselves (JOIN on the chunk protocol) and those a peer passed on (MEMBERS).
 * This is how a burst finds itself in milliseconds: every node tells the peers
 * it is connected to (at least the bootstrap seeds) as it mounts, and they pass
 * it on, while DHT provider records take seconds to spread under load, and a
 * node that looked too early saw an empty swarm and went to the origin. The DHT
 * still finds the members nobody told us about.
 *
 * A member that died stays listed until pushed out by newer ones: the peer
 * source skips peers that do not answer, so a stale entry costs one failed try.
 *
 * Adds and samples cost O(1) and O(RECENT), not O(members): in a 10,000-node
 * burst a node hears tens of thousands of JOIN and MEMBERS entries.
 */
export class SwarmMembers {
  private readonly byKey = new Map<Digest, Swarm>()
  /** The foreign swarms, least recently mentioned first, and their members in all. */
  private readonly foreign = new Map<Digest, Swarm>()
  private foreignMembers = 0
  private readonly limits: { readonly [K in keyof typeof FOREIGN_SWARM_LIMITS]: number }
  private readonly keyOf: (peer: PeerId) => NodeKey
  private readonly now: () => number

  /**
   * `keyOf`: a peer's rendezvous key; the simulation model passes its cache (PeerKeys) shared by 10,000 nodes.
   * `foreign`: FOREIGN_SWARM_LIMITS overrides.
   */
  constructor (options: { keyOf?: (peer: PeerId) => NodeKey, foreign?: Partial<Record<keyof typeof FOREIGN_SWARM_LIMITS, number>>, now?: () => number } = {}) {
    this.keyOf = options.keyOf ?? (peer => nodeKey(peer.toString()))
    this.limits = { ...FOREIGN_SWARM_LIMITS, ...options.foreign }
    this.now = options.now ?? Date.now
  }

  /** This node joined `key`'s swarm: its members are kept for good (within the per-key cap). */
  own (key: Digest): void {
    const swarm = this.swarm(key)
    if (swarm.own) return
    swarm.own = true
    this.foreign.delete(key)
    this.foreignMembers -= swarm.entries.size
  }

  isOwn (key: Digest): boolean {
    return this.byKey.get(key)?.own === true
  }

  /** Swarm keys kept, own and foreign. */
  keyCount (): number {
    return this.byKey.size
  }

  /** Records a member (keeping its last addresses if these are none); true if it was not known for this key before. */
  add (key: Digest, peer: PeerId, addresses: readonly string[]): boolean {
    const swarm = this.swarm(key)
    const id = peer.toString()
    const entry = swarm.entries.get(id)
    if (entry !== undefined) {
      swarm.entries.delete(id) // to the end: the most recently heard
      swarm.entries.set(id, entry)
      if (addresses.length > 0) entry.addresses = [...addresses]
    } else {
      swarm.entries.set(id, { peer, addresses: addresses.length > 0 ? [...addresses] : NO_ADDRESSES })
      if (!swarm.own && ++this.foreignMembers > this.limits.maxMembers) this.shed(swarm)
      const core = inCore(this.keyOf(peer), swarm.group)
      if (core) swarm.core.add(id)
      // See `of`: rebuilt once the core or the rest grew by an eighth (the first core members at once).
      const grown = core
        ? swarm.core.size >= Math.max(swarm.listCore + 1, swarm.listCore * 9 / 8)
        : swarm.entries.size >= (swarm.list?.length ?? 0) * 9 / 8
      if (grown) swarm.list = undefined
      if (swarm.entries.size > MAX_MEMBERS_PER_KEY * 1.25) this.prune(swarm)
    }
    swarm.recent[swarm.next] = id
    swarm.next = (swarm.next + 1) % RECENT
    const waiting = swarm.waiters
    swarm.waiters = []
    for (const wake of waiting) wake()
    return entry === undefined
  }

  /** Resolves at the next `add` for `key`; rejects with the signal's reason, leaving no waiter behind. */
  changed (key: Digest, signal: AbortSignal): Promise<void> {
    if (signal.aborted) return Promise.reject(signal.reason)
    const swarm = this.swarm(key)
    return new Promise<void>((resolve, reject) => {
      const wake = (): void => {
        signal.removeEventListener('abort', onAbort)
        resolve()
      }
      // A key nobody else joins would otherwise keep every caller's waiter for the process's life.
      const onAbort = (): void => {
        const i = swarm.waiters.indexOf(wake)
        if (i >= 0) swarm.waiters.splice(i, 1)
        reject(signal.reason)
      }
      signal.addEventListener('abort', onAbort, { once: true })
      swarm.waiters.push(wake)
    })
  }

  /**
   * The members of `key`'s swarm: the same array until it is rebuilt, so callers
   * may cache what they derive from it. It is rebuilt when the core members, or
   * the others, have grown by an eighth since the last build (the first eight
   * core members one by one), not for each newcomer: a node in a 10,000-node
   * burst hears of thousands (312 of them core per key), and every caller
   * deriving a view from each would be quadratic.
   */
  of (key: Digest): readonly PeerId[] {
    const swarm = this.byKey.get(key)
    if (swarm === undefined) return NOBODY
    // In use: not expired. Not moved in the LRU: that is for writes.
    if (!swarm.own) swarm.heardAt = this.now()
    if (swarm.list === undefined) {
      swarm.list = Array.from(swarm.entries.values(), e => e.peer)
      swarm.listCore = swarm.core.size
    }
    return swarm.list
  }

  /**
   * Whether a new connection should hear our JOIN for `key`, to answer with the
   * members it knows: while our view is small. Beyond ENOUGH members, every
   * connection of a big burst answered with 64 that we mostly knew (tens of
   * thousands per node at 10,000 modelled nodes).
   */
  wantsMore (key: Digest): boolean {
    return (this.byKey.get(key)?.entries.size ?? 0) < ENOUGH
  }

  /**
   * Peer exchange, when JOINER joins `key`'s swarm through us: what it hears
   * (MEMBERS) and whom we tell of it. It hears of the most recently heard and of
   * the core; a few of the most recently heard hear of it. A joiner in the core
   * hears of every core member we know, and they of it: roots are drawn from
   * the core, and they agree only if core nodes know each other.
   * Then records the joiner.
   */
  exchange (key: Digest, joiner: PeerId, addresses: readonly string[]): { answer: SwarmMember[], passOn: string[] } {
    const swarm = this.swarm(key)
    const except = joiner.toString()
    const joinerInCore = inCore(this.keyOf(joiner), swarm.group)
    const recent = this.sample(key, RECENT_MEMBERS, except)
    const answer = new Map(recent.map(m => [m.id, m]))
    const passOn = new Set(recent.slice(0, PASS_ON).map(m => m.id))
    let room = joinerInCore ? Infinity : CORE_MEMBERS
    for (const id of swarm.core) {
      if (id === except) continue
      if (room-- <= 0) break
      answer.set(id, { id, addresses: swarm.entries.get(id)!.addresses })
      if (joinerInCore) passOn.add(id)
    }
    this.add(key, joiner, addresses)
    return { answer: [...answer.values()], passOn: [...passOn] }
  }

  /** Up to `limit` members to pass on, leaving out `except`: the most recently heard first, then any. */
  sample (key: Digest, limit: number, except: string): SwarmMember[] {
    const swarm = this.byKey.get(key)
    if (swarm === undefined) return []
    const found: SwarmMember[] = []
    const seen = new Set<string>([except])
    const ring = swarm.recent
    for (let i = 1; i <= ring.length && found.length < limit; i++) {
      const id = ring[(swarm.next - i + RECENT) % RECENT]!
      if (seen.has(id)) continue
      seen.add(id)
      const entry = swarm.entries.get(id)
      if (entry !== undefined) found.push({ id, addresses: entry.addresses })
    }
    if (found.length < limit) {
      for (const [id, entry] of swarm.entries) {
        if (found.length >= limit) break
        if (seen.has(id)) continue
        found.push({ id, addresses: entry.addresses })
      }
    }
    return found
  }

  /** The swarm of `key`, created if new; a foreign one counts as mentioned now. */
  private swarm (key: Digest): Swarm {
    let swarm = this.byKey.get(key)
    if (swarm === undefined) {
      swarm = new Swarm(key)
      this.byKey.set(key, swarm)
    }
    if (!swarm.own) {
      swarm.heardAt = this.now()
      this.foreign.delete(key) // to the end: the most recently mentioned
      this.foreign.set(key, swarm)
      this.shed(swarm)
    }
    return swarm
  }

  /**
   * Forgets foreign swarms, the least recently mentioned first: those not
   * mentioned for ttlMs, then while over maxKeys or maxMembers (never `keep`,
   * the one in use; over the per-key cap it prunes itself).
   */
  private shed (keep: Swarm): void {
    const expired = this.now() - this.limits.ttlMs
    for (const [key, swarm] of this.foreign) {
      if (swarm === keep) break
      if (swarm.heardAt > expired && this.foreign.size <= this.limits.maxKeys && this.foreignMembers <= this.limits.maxMembers) break
      this.foreign.delete(key)
      this.byKey.delete(key)
      this.foreignMembers -= swarm.entries.size
      // Whoever waits on it looks again, and finds a swarm of its own.
      const waiting = swarm.waiters
      swarm.waiters = []
      for (const wake of waiting) wake()
    }
  }

  /** Drops the least recently heard beyond the cap but the core, in one pass per 256 new members. */
  private prune (swarm: Swarm): void {
    let excess = swarm.entries.size - MAX_MEMBERS_PER_KEY
    for (const id of swarm.entries.keys()) {
      if (excess <= 0) break
      if (swarm.core.has(id)) continue
      swarm.entries.delete(id)
      if (!swarm.own) this.foreignMembers--
      excess--
    }
    swarm.list = undefined
  }
}

const NOBODY: readonly PeerId[] = Object.freeze([])
/** Shared by every entry heard of without addresses (the simulation model's: a 10,000-node run holds millions). */
const NO_ADDRESSES: readonly string[] = Object.freeze([])
