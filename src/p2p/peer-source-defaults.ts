import { UsageError } from '../errors.ts'
import { RESOLVER_DEFAULTS } from '../fetch/constants.ts'

/**
 * The peer source's timing and breadth. Exported so the simulation model and the
 * docs read the same numbers the agent runs with; apart from peer-source.ts (which
 * loads libp2p's utilities) so that the agent's config can check a chunk timeout
 * without loading libp2p, which `shoal run --no-p2p` never needs.
 */
export const PEER_SOURCE_DEFAULTS = {
  /** Deadline for one peer's answer (on top of the parent wait, for parent requests, and of the transfer time below). */
  peerTimeoutMs: 500,
  /**
   * The slowest transfer a peer's answer is allowed before it times out (and
   * before a second holder is raced against it): a chunk's deadline grows by its
   * stored size at this rate. Between agents starved of CPU (20 on 2 cores) a
   * 2 MiB chunk took over a second, and a flat 500 ms timed out every big chunk
   * and sent it to the origin: a few chunks, half the origin's bytes.
   */
  slowPeerBytesPerSecond: 1 << 20,
  /** A holder that has not answered by then gets a second holder raced against it. */
  hedgeDelayMs: 200,
  /** How long a parent may hold our request while it fetches; then it answers `pending` and we ask again. */
  parentWaitMs: 2000,
  /**
   * More time a parent's answer gets (on top of parentWaitMs, the peer deadline and
   * the transfer). Leaving a slow parent gains nothing (the next one fetches the
   * chunk through a chain of its own) and a dead one fails at once (its connection
   * closes), while a starved parent answers `pending` late: at 20 agents on 2 cores
   * its timer and its other replies delay it by seconds.
   */
  parentGraceMs: 2000,
  /** Bound on one `get` without progress: after this the resolver goes to the origin. */
  maxWaitMs: 8000,
  /**
   * While a parent keeps answering `pending` (its own fetch is alive), the wait
   * goes on, up to this: at 3,000 modelled nodes, children that left deep
   * catalog chains at 8 s swamped the origin and 81 mounts failed. peerBudgetMs
   * caps it below the chunk timeout, which must leave the origin a try.
   */
  maxPendingWaitMs: 14_000,
  /**
   * How long `get` waits for a swarm's first lookup when nobody has told us of
   * themselves yet (members that did are the answer at once: PackRouter); later
   * lookups refresh in the background.
   */
  lookupWaitMs: 1500,
  /**
   * A whole blob this small (a chunk that is its own pack: an image's manifest,
   * signature and config) comes from the origin, not from peers, while its swarm
   * has fewer than directBlobMaxSwarm other members. A mount reads four of them
   * one after the other, each a round trip through a distribution tree of
   * CPU-starved agents (0.5-1.5 s each in a real 10-node burst) where the origin
   * answers in milliseconds, to save 5-6 KB a node. Catalogs (hundreds of KB)
   * still go to peers.
   */
  directBlobBytes: 64 * 1024,
  /**
   * In a bigger swarm they go to peers again: at 2,000 modelled nodes, 6 KB a
   * node from the origin was 1.8 times a lone node's whole egress. Below 32 nodes
   * it is under 3 % of it.
   */
  directBlobMaxSwarm: 32,
  /**
   * A node that finds itself the root of a chunk or whole blob less than this after
   * its first look at the swarm waits, while a peer it is connected to but has not
   * heard join would outrank it, for that peer to join (then it is a child) or for
   * this much to pass. The first nodes of a burst reach the catalogs a second or two
   * after joining the image's swarm, when they have heard of one or two members: each
   * took itself for the root and the origin sent the catalogs three times (real
   * 20-node burst; 3 s was not always enough on a loaded machine). Chunks too: once
   * a burst's mounts stopped waiting on DHT walks, the first node read a chunk
   * knowing 4 of 19 members, and the chunk's true root fetched it again (the model at
   * 20 and 100 nodes). A node that no connected peer outranks does not wait: every
   * node of a burst used to wait the whole 5 s, and the mounts with them.
   */
  rootWaitMs: 5000,
  /**
   * A chunk's root waits (rootWaitMs) only while it knows fewer members than this: in
   * a small swarm nodes connect to each other and a connected outsider joins in a
   * moment; in a big one a node is connected to a few of the members, waits for those
   * that mount late, and at 1,000 modelled nodes p99 grew. Whole blobs wait in any swarm.
   */
  rootWaitMaxSwarm: 32,
  /** How often a waiting root looks at its swarm again (see rootWaitMs). */
  rootPollMs: 100,
  /** Ban for a peer that sent bad bytes or broke the protocol. */
  banMs: 5 * 60_000,
  /** A slow or dead peer is skipped for this long, doubling with each failure in a row up to banMs. */
  suspectMs: 10_000,
  /**
   * How long a peer's availability answer is trusted before it is refreshed (in
   * the background). At 5 s, the refreshes (each pack read, four peers asked) were
   * most of the frames a burst's agents exchanged, for answers only roots wait for;
   * a holder that sends us a chunk is noted at once anyway (noteHolds).
   */
  availabilityTtlMs: 15_000,
  /** Swarm peers asked for availability per pack. */
  availabilitySample: 4,
  /** Parents to try before giving up to the origin. */
  maxParents: 3,
  /** Known holders to try. */
  maxHolders: 4,
  /** At most this much of the event loop's delay is added to deadlines, and of it and the transfer time to a get's budget. */
  maxLagAllowanceMs: 4000,
  /**
   * The end of the resolver's chunk timeout kept for the origin: a get never runs
   * past the chunk timeout minus this, whatever parents say (see peerBudgetMs).
   */
  originReserveMs: 2000,
  /** The least time a get may have; a chunk timeout that leaves less is refused. */
  minBudgetMs: 1000
} as const

/** The resolver's default chunk timeout, which the peer source assumes unless told its own. */
export const DEFAULT_CHUNK_TIMEOUT_MS = RESOLVER_DEFAULTS.timeoutMs

/**
 * The longest one `get` may take, pending parents and lag allowance included, so
 * that a chunk timeout of CHUNKTIMEOUTMS always leaves the origin a try after the
 * peers gave up. At the default 20 s this is 18 s, which the waits above never
 * exceed (maxPendingWaitMs + maxLagAllowanceMs); a shorter timeout shortens them.
 */
export function peerBudgetMs (chunkTimeoutMs: number, settings: Pick<Settings, 'originReserveMs' | 'minBudgetMs'> = PEER_SOURCE_DEFAULTS): number {
  const budget = chunkTimeoutMs - settings.originReserveMs
  if (!(budget >= settings.minBudgetMs)) {
    throw new UsageError(`a chunk timeout of ${chunkTimeoutMs} ms leaves the peers no time (the origin keeps the last ${settings.originReserveMs} ms, peers need ${settings.minBudgetMs} ms): use --chunk-timeout ${settings.originReserveMs + settings.minBudgetMs} or more, or --no-p2p`)
  }
  return budget
}

export type Settings = { readonly [K in keyof typeof PEER_SOURCE_DEFAULTS]: number }
