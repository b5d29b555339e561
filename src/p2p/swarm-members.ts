import type { PeerId } from '@libp2p/interface'
import type { Digest } from '../format/digest.ts'
import type { SwarmMember } from './chunk-protocol.ts'

/** Members kept per swarm key; the oldest heard are dropped beyond it. */
const MAX_MEMBERS_PER_KEY = 1024

interface Entry { peer: PeerId, addresses: string[] }

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
 */
export class SwarmMembers {
  private readonly byKey = new Map<Digest, Map<string, Entry>>()
  private readonly waiters = new Map<Digest, Array<() => void>>()

  /** Records a member; true if it was not known for this key before. */
  add (key: Digest, peer: PeerId, addresses: readonly string[]): boolean {
    let members = this.byKey.get(key)
    if (members === undefined) {
      members = new Map()
      this.byKey.set(key, members)
    }
    const id = peer.toString()
    const known = members.delete(id) // re-inserted last: the most recently heard come last
    members.set(id, { peer, addresses: [...addresses] })
    if (members.size > MAX_MEMBERS_PER_KEY) members.delete(members.keys().next().value!)
    const waiting = this.waiters.get(key)
    this.waiters.delete(key)
    for (const wake of waiting ?? []) wake()
    return !known
  }

  /** Resolves at the next `add` for `key`; rejects with the signal's reason, leaving no waiter behind. */
  changed (key: Digest, signal: AbortSignal): Promise<void> {
    if (signal.aborted) return Promise.reject(signal.reason)
    let waiting = this.waiters.get(key)
    if (waiting === undefined) {
      waiting = []
      this.waiters.set(key, waiting)
    }
    const list = waiting
    return new Promise<void>((resolve, reject) => {
      const wake = (): void => {
        signal.removeEventListener('abort', onAbort)
        resolve()
      }
      // A key nobody else joins would otherwise keep every caller's waiter for the process's life.
      const onAbort = (): void => {
        const i = list.indexOf(wake)
        if (i >= 0) list.splice(i, 1)
        if (list.length === 0 && this.waiters.get(key) === list) this.waiters.delete(key)
        reject(signal.reason)
      }
      signal.addEventListener('abort', onAbort, { once: true })
      list.push(wake)
    })
  }

  of (key: Digest): PeerId[] {
    return [...(this.byKey.get(key)?.values() ?? [])].map(e => e.peer)
  }

  /** Up to `limit` members to pass on, the most recently heard first, leaving out `except`. */
  sample (key: Digest, limit: number, except: string): SwarmMember[] {
    const entries = [...(this.byKey.get(key)?.entries() ?? [])].reverse()
    return entries.filter(([id]) => id !== except).slice(0, limit).map(([id, e]) => ({ id, addresses: e.addresses }))
  }
}
