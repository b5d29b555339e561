/**
 * Peers that served bad bytes, banned until a deadline. One instance is shared
 * by the node's connection gater (a banned peer can neither dial us nor be
 * dialled) and the peer chunk source (which bans, and skips banned peers).
 */
export class PeerBans {
  private readonly until = new Map<string, number>()
  private readonly now: () => number

  constructor (options: { now?: () => number } = {}) {
    this.now = options.now ?? Date.now
  }

  ban (peer: string, ms: number): void {
    this.until.set(peer, Math.max(this.until.get(peer) ?? 0, this.now() + ms))
  }

  isBanned (peer: string): boolean {
    const until = this.until.get(peer)
    if (until === undefined) return false
    if (until > this.now()) return true
    this.until.delete(peer)
    return false
  }
}
