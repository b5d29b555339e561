import type { PeerId } from '@libp2p/interface'
import type { Digest } from '../format/digest.ts'
import type { SwarmMember } from './chunk-protocol.ts'

/** Members kept per swarm key; at a quarter more, the least recently heard are dropped down to it. */
const MAX_MEMBERS_PER_KEY = 1024
/** Ids heard last, per key, duplicates included: where `sample` looks first. */
const RECENT = 128

interface Entry { peer: PeerId, addresses: string[], heard: number }

/** One swarm key's members. */
class Swarm {
  readonly entries = new Map<string, Entry>()
  /** A ring of the ids heard last; `next` is where the next goes. */
  readonly recent: string[] = []
  next = 0
  /** Bumped whenever the set of members changes (not on a re-heard one). */
  version = 0
  /** `of`'s answer for `version`. */
  list: { version: number, peers: readonly PeerId[] } | undefined
  waiters: Array<() => void> = []
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
  /** Orders hearings across keys: what `prune` keeps by. */
  private heard = 0

  /** Records a member (keeping its last addresses if these are none); true if it was not known for this key before. */
  add (key: Digest, peer: PeerId, addresses: readonly string[]): boolean {
    const swarm = this.swarm(key)
    const id = peer.toString()
    const heard = ++this.heard
    const entry = swarm.entries.get(id)
    if (entry !== undefined) {
      entry.heard = heard
      if (addresses.length > 0) entry.addresses = [...addresses]
    } else {
      swarm.entries.set(id, { peer, addresses: [...addresses], heard })
      swarm.version++
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

  /** Every member of `key`'s swarm. The same array until the set of members changes, so callers may cache what they derive from it. */
  of (key: Digest): readonly PeerId[] {
    const swarm = this.byKey.get(key)
    if (swarm === undefined) return NOBODY
    if (swarm.list?.version !== swarm.version) {
      swarm.list = { version: swarm.version, peers: Array.from(swarm.entries.values(), e => e.peer) }
    }
    return swarm.list.peers
  }

  /** Up to `limit` members to pass on, leaving out `except`: the most recently heard first, then any. */
  sample (key: Digest, limit: number, except: string): SwarmMember[] {
    const swarm = this.byKey.get(key)
    if (swarm === undefined) return []
    const found = new Map<string, SwarmMember>()
    const take = (id: string): void => {
      const entry = swarm.entries.get(id)
      if (id !== except && entry !== undefined && !found.has(id)) found.set(id, { id, addresses: entry.addresses })
    }
    for (let i = 1; i <= swarm.recent.length && found.size < limit; i++) {
      take(swarm.recent[(swarm.next - i + RECENT) % RECENT]!)
    }
    for (const id of swarm.entries.keys()) {
      if (found.size >= limit) break
      take(id)
    }
    return [...found.values()]
  }

  private swarm (key: Digest): Swarm {
    let swarm = this.byKey.get(key)
    if (swarm === undefined) {
      swarm = new Swarm()
      this.byKey.set(key, swarm)
    }
    return swarm
  }

  /** Drops the least recently heard beyond the cap, in one batch (a sort per 256 new members, not a scan per add). */
  private prune (swarm: Swarm): void {
    const keep = [...swarm.entries].sort((x, y) => y[1].heard - x[1].heard).slice(0, MAX_MEMBERS_PER_KEY)
    swarm.entries.clear()
    for (const [id, entry] of keep) swarm.entries.set(id, entry)
    swarm.version++
  }
}

const NOBODY: readonly PeerId[] = Object.freeze([])
