/**
 * Rendezvous (highest-random-weight) hashing and source selection for bursts.
 *
 * Every node that wants a pack announces it, so every node can see (roughly)
 * the same swarm. For each chunk, the node with the highest score(node, chunk)
 * is its OWNER: the only one that fetches it from the origin. Everyone else
 * asks the owner. When the owner dies or stalls, dropping it from the candidate
 * set makes the next node in score order the owner, and only the chunks the
 * dead node owned move (that is what HRW gives over `hash % n`).
 *
 * Pure and synchronous: no IO, no clocks, no libp2p types. The discrete-event
 * simulator imports this module to drive 10,000+ simulated nodes with the same
 * selection code the agent runs, so it is also written to be cheap: scores are
 * two 32-bit integer mixes, not a cryptographic hash per (node, chunk) pair.
 */

/** A node's precomputed hash words. Build once per node with `nodeKey`. */
export interface NodeKey {
  readonly id: string
  readonly a: number
  readonly b: number
}

/** A chunk's hash words (taken from its SHA-256 digest). */
export interface ChunkKey {
  readonly a: number
  readonly b: number
}

/** murmur3's 32-bit finaliser: a cheap bijection with full avalanche. */
function fmix32 (h: number): number {
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0
}

/** FNV-1a over UTF-16 code units from a given offset basis, then fmix32. */
function hashString (s: string, basis: number): number {
  let h = basis
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  return fmix32(h >>> 0)
}

/**
 * Peer ids share long common prefixes (`12D3KooW…`), which is why the string
 * hash is mixed again rather than used raw.
 */
export function nodeKey (id: string): NodeKey {
  return { id, a: hashString(id, 0x811c9dc5), b: hashString(id, 0x050c5d1f) }
}

/**
 * A chunk digest is already uniformly random, so its first 64 bits are the
 * key. Accepts `sha256:<hex>` or bare hex.
 */
export function chunkKey (digest: string): ChunkKey {
  const hex = digest.startsWith('sha256:') ? digest.slice(7) : digest
  const a = Number.parseInt(hex.slice(0, 8), 16)
  const b = Number.parseInt(hex.slice(8, 16), 16)
  if (!Number.isInteger(a) || !Number.isInteger(b) || hex.length < 16) {
    throw new RangeError(`chunk key needs at least 16 hex digits, got ${JSON.stringify(digest)}`)
  }
  return { a, b }
}

/** A 53-bit score: exact as a double, so comparisons need no BigInt. */
export function score (node: NodeKey, key: ChunkKey): number {
  return fmix32(node.a ^ key.a) * 2 ** 21 + (fmix32(node.b ^ key.b) >>> 11)
}

/** True when `x` outranks `y` for `key`; ties (2^-53) are broken by id so every node agrees. */
function outranks (x: NodeKey, sx: number, y: NodeKey, sy: number): boolean {
  return sx > sy || (sx === sy && x.id > y.id)
}

/**
 * The top `k` nodes for `key`, best first, skipping nodes for which `skip`
 * returns true. O(n·k), which beats sorting for the small k the policy uses.
 */
export function topNodes<N extends NodeKey> (key: ChunkKey, nodes: readonly N[], k: number, skip?: (node: N) => boolean): N[] {
  const best: N[] = []
  const scores: number[] = []
  for (const node of nodes) {
    if (skip?.(node) === true) continue
    const s = score(node, key)
    if (best.length === k && !outranks(node, s, best[k - 1]!, scores[k - 1]!)) continue
    let i = best.length === k ? k - 1 : best.length
    // insertion into a sorted array of at most k entries
    while (i > 0 && outranks(node, s, best[i - 1]!, scores[i - 1]!)) {
      best[i] = best[i - 1]!
      scores[i] = scores[i - 1]!
      i--
    }
    best[i] = node
    scores[i] = s
  }
  return best
}

/** Every node for `key`, best first (for tests and the simulator's reports). */
export function rankNodes<N extends NodeKey> (key: ChunkKey, nodes: readonly N[]): N[] {
  return topNodes(key, nodes, nodes.length)
}

/** The owner of `key` among `nodes` (undefined for an empty swarm). */
export function ownerOf<N extends NodeKey> (key: ChunkKey, nodes: readonly N[], skip?: (node: N) => boolean): N | undefined {
  return topNodes(key, nodes, 1, skip)[0]
}

/**
 * The key a given requester uses to order holders: mixing the requester in
 * means different requesters prefer different holders of the same chunk, so
 * load spreads over holders, while each requester stays consistent (it keeps
 * going back to the same holder, whose connection is already warm).
 */
export function spreadKey (key: ChunkKey, requester: NodeKey): ChunkKey {
  return { a: fmix32(key.a ^ requester.b), b: fmix32(key.b ^ requester.a) }
}

export interface SelectionInput<N extends NodeKey> {
  key: ChunkKey
  self: N
  /** Everyone known to have announced the pack: holders and wanters. May include self. */
  swarm: readonly N[]
  /** Peers known to hold this chunk right now. */
  holders: readonly N[]
  /** Banned, or suspected dead/stalled: neither owner nor holder for now. */
  excluded: (id: string) => boolean
  /** How many owners (in hash order) to try before fetching from the origin ourselves. */
  maxOwners: number
  /** How many holders to consider. */
  maxHolders: number
}

export interface Selection<N extends NodeKey> {
  /** This node is the chunk's owner: it alone should fetch it from the origin. */
  selfIsOwner: boolean
  /**
   * Owners to ask, in hash order. The list stops where self would come: if
   * everyone ranked above us fails, we are the owner and fetch it ourselves.
   */
  owners: N[]
  /** Known holders in this requester's spread order. */
  holders: N[]
}

/** The burst policy: who owns a chunk, and whom to ask for it, in what order. */
export function selectSources<N extends NodeKey> (input: SelectionInput<N>): Selection<N> {
  const { key, self, excluded } = input
  const candidates = input.swarm.some(n => n.id === self.id) ? input.swarm : [...input.swarm, self]
  const ranked = topNodes(key, candidates, input.maxOwners + 1, n => n.id !== self.id && excluded(n.id))
  const selfRank = ranked.findIndex(n => n.id === self.id)
  const owners = (selfRank === -1 ? ranked : ranked.slice(0, selfRank)).slice(0, input.maxOwners)
  const holders = topNodes(spreadKey(key, self), input.holders, input.maxHolders, n => n.id === self.id || excluded(n.id))
  return { selfIsOwner: selfRank === 0, owners, holders }
}
