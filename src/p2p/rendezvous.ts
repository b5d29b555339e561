/**
 * Rendezvous (highest-random-weight) hashing and source selection for bursts.
 *
 * Every node that wants a pack announces it, so every node can see (roughly)
 * the same swarm. score(node, chunk) ranks the swarm per chunk; the top node is
 * the chunk's ROOT (the one that fetches it from the origin) and the ranking
 * shapes the chunk's distribution tree (`selectSources`). When a node dies or
 * stalls, dropping it moves only the chunks it ranked high for (that is what
 * HRW gives over `hash % n`).
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
 * returns true. O(n·k), which beats sorting for the small k the policy uses;
 * `skip` is asked only of nodes that would make the top k so far (it runs over
 * swarms of a thousand for every chunk, and looks up bans and suspicions).
 */
export function topNodes<N extends NodeKey> (key: ChunkKey, nodes: readonly N[], k: number, skip?: (node: N) => boolean): N[] {
  const best: N[] = []
  const scores: number[] = []
  if (k <= 0) return best
  for (const node of nodes) {
    const s = score(node, key)
    if (best.length === k && !outranks(node, s, best[k - 1]!, scores[k - 1]!)) continue
    if (skip?.(node) === true) continue
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

/** The root of `key` among `nodes`: the top-ranked one (undefined for an empty swarm). */
export function rootOf<N extends NodeKey> (key: ChunkKey, nodes: readonly N[], skip?: (node: N) => boolean): N | undefined {
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

/** One node in this many is in a swarm's core (see `inCore`). */
export const CORE_SHARE = 32
/**
 * A node uses its swarm's core (passes `group` to selectSources) once it knows
 * this many members: a core of 8 or more. In a smaller swarm the core is a node
 * or two, and a real 20-node burst showed the cost: the one core node was the
 * root of every chunk of its layer, its 8 origin requests at a time fell behind,
 * and children gave up on it (chunk egress 5.6x instead of 1.0-1.3).
 * Nodes whose views straddle the threshold rank differently, so while a big
 * swarm forms a request chain can loop: two nodes asking each other are
 * refused at once (PeerChunkSource.isAsking); a longer loop ends at the peer
 * source's budget and the origin.
 */
export const LARGE_SWARM = 256

/**
 * Whether NODE is in the core of the swarm whose key is GROUP: a fixed property
 * of the pair (a hash below 2^32 / CORE_SHARE), so every node agrees on it
 * whatever part of the swarm it knows. In a burst of N, about N / 32 nodes.
 */
export function inCore (node: NodeKey, group: ChunkKey): boolean {
  return fmix32(node.a ^ group.a) < 2 ** 32 / CORE_SHARE
}

export interface SelectionInput<N extends NodeKey> {
  key: ChunkKey
  self: N
  /** Everyone known to have announced the pack: holders and wanters. May include self. */
  swarm: readonly N[]
  /** Peers known to hold this chunk right now. */
  holders: readonly N[]
  /** Banned: neither parent nor holder. */
  excluded: (id: string) => boolean
  /**
   * Slow or unreachable lately: not a holder, and a parent only when too few
   * others outrank us (asked last). A suspect never makes us the root: in a
   * real 20-node burst on 2 cores, starved peers answered late, and children
   * that left them out took themselves for roots and went to the origin.
   */
  suspect?: (id: string) => boolean
  /** How many parents to try before fetching from the origin ourselves. */
  maxParents: number
  /** How many holders to consider. */
  maxHolders: number
  /** The key of the swarm the chunk is shared in, for a large swarm (LARGE_SWARM): with it, only its core may be roots. */
  group?: ChunkKey
}

export interface Selection<N extends NodeKey> {
  /** Nobody eligible outranks this node: it is the chunk's root and fetches it from the origin. */
  isRoot: boolean
  /** Parents to ask (each fetches the chunk if it lacks it), in this requester's spread order. */
  parents: N[]
  /** Known holders in this requester's spread order. */
  holders: N[]
  /**
   * For a root: the two nodes ranked right below it, best first (suspects left
   * out, as from the holders). While a swarm forms, a node that joins later can
   * outrank the root that already fetched the chunk, which is then most often
   * one of these.
   */
  runnersUp: N[]
}

/**
 * The burst policy: one distribution tree per chunk.
 *
 * Nodes are ranked per chunk: core nodes of the chunk's swarm (`inCore`, when
 * `group` is given) above all others, and within each, by score(node, chunk).
 * The top node of the swarm is the chunk's root: the only one that fetches it
 * from the origin. Every other node asks a PARENT that outranks it, which
 * fetches the chunk the same way (from its own parent) if it lacks it: one of
 * its own kind (core or not) with a higher score, picked in its own spread
 * order, or, outside the core, when it knows no such node, a core node. Every
 * node agrees on the order, so rank strictly increases along every request
 * chain and chains end at a root and never loop, even when nodes see
 * different samples of the swarm. Picking the parent at random among those
 * that outrank us makes each tree a random recursive tree: expected depth about
 * ln N and a root with about ln N children, so no node serves everybody, and
 * as every node is a parent for some chunks and a leaf for others, uploads even
 * out. A dead or stalled parent is asked last; the requester moves to another,
 * and when nobody (but banned peers) outranks it, it becomes the root.
 *
 * Why the core: a node's view of a big swarm is a sample (peer exchange keeps
 * about 1,024 members per key), and by score alone the top of a sample is often
 * not the top of the swarm, so a chunk got several roots (2.3x the unique
 * chunks from the origin at 2,000 modelled nodes). With a core, only core nodes
 * can be roots (a node outside it that knows a core node is never one), and the
 * core is small enough (1 in 32) for peer exchange to make every core node know
 * every other (SwarmMembers). Nodes outside the core ask the core only from the
 * top of their own kind, so the core is not everybody's parent: in a real
 * 20-node burst, where one node was the core, asking it first made it the
 * parent of all and it fell behind (see also LARGE_SWARM).
 */
export function selectSources<N extends NodeKey> (input: SelectionInput<N>): Selection<N> {
  const { key, self, excluded, group, maxParents } = input
  const suspect = input.suspect ?? (() => false)
  const selfScore = score(self, key)
  const selfInCore = group !== undefined && inCore(self, group)
  const spread = spreadKey(key, self)
  const unusable = (n: N): boolean => n.id === self.id || excluded(n.id)
  // Runs for every chunk over swarms of a thousand: one pass, no copies, the cheap test first.
  const sameKind = (n: N): boolean => group === undefined || inCore(n, group) === selfInCore
  const above = (n: N): boolean => outranks(n, score(n, key), self, selfScore) && sameKind(n)
  // Outside the core of a large swarm, core nodes fill the parents when too few of our kind outrank us.
  const coreFill = (n: N): boolean => group !== undefined && !selfInCore && inCore(n, group)
  const parents = topNodes(spread, input.swarm, maxParents, n => !above(n) || unusable(n) || suspect(n.id))
  if (group !== undefined && !selfInCore && parents.length < maxParents) {
    parents.push(...topNodes(spread, input.swarm, maxParents - parents.length, n => !coreFill(n) || unusable(n) || suspect(n.id)))
  }
  if (parents.length < maxParents) {
    parents.push(...topNodes(spread, input.swarm, maxParents - parents.length, n => !suspect(n.id) || !(above(n) || coreFill(n)) || unusable(n)))
  }
  const holders = topNodes(spread, input.holders, input.maxHolders, n => unusable(n) || suspect(n.id))
  const isRoot = parents.length === 0
  const runnersUp = isRoot ? topNodes(key, input.swarm, 2, n => above(n) || !sameKind(n) || unusable(n) || suspect(n.id)) : []
  return { isRoot, parents, holders, runnersUp }
}
