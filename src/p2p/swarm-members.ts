import type { PeerId } from '@libp2p/interface'
import type { Digest } from '../format/digest.ts'

/** Keys one peer may have joined as far as we keep track; a peer claiming more is ignored beyond it. */
const MAX_KEYS_PER_PEER = 4096

/**
 * Who told us directly (a JOIN on the chunk protocol) that they are in a swarm.
 * This is how a burst finds itself in milliseconds: every node tells the peers
 * it is connected to as it mounts, while DHT provider records take seconds to
 * spread under load and a node that looked too early saw an empty swarm and
 * went to the origin. The DHT still finds the members we are not connected to.
 * Entries last as long as the connection: `forgetPeer` on disconnect.
 */
export class SwarmMembers {
  private readonly byKey = new Map<Digest, Map<string, PeerId>>()
  private readonly byPeer = new Map<string, Set<Digest>>()

  add (key: Digest, peer: PeerId): void {
    const id = peer.toString()
    let keys = this.byPeer.get(id)
    if (keys === undefined) {
      keys = new Set()
      this.byPeer.set(id, keys)
    }
    if (!keys.has(key) && keys.size >= MAX_KEYS_PER_PEER) return
    keys.add(key)
    let members = this.byKey.get(key)
    if (members === undefined) {
      members = new Map()
      this.byKey.set(key, members)
    }
    members.set(id, peer)
  }

  of (key: Digest): PeerId[] {
    return [...(this.byKey.get(key)?.values() ?? [])]
  }

  forgetPeer (peer: PeerId): void {
    const id = peer.toString()
    for (const key of this.byPeer.get(id) ?? []) {
      const members = this.byKey.get(key)
      members?.delete(id)
      if (members?.size === 0) this.byKey.delete(key)
    }
    this.byPeer.delete(id)
  }
}
