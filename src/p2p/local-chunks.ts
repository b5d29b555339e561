import type { ChunkRef } from '../format/catalog.ts'
import { Codec } from '../format/codec.ts'
import type { Digest } from '../oci/digest.ts'
import { systemClock, type Clock } from '../util/clock.ts'
import type { ByteRange } from './chunk-protocol.ts'
import type { LocalChunks } from './chunk-server.ts'

/**
 * How this node serves its peers, beyond the chunk server's per-request limits
 * (CHUNK_SERVER_DEFAULTS). The simulation model (simulations/lib/model-world.ts)
 * imports these: the policy it models is this one.
 */
export const SERVING_DEFAULTS = {
  /**
   * Fetches this node makes at once on peers' behalf, as their parent in a chunk's
   * tree. A hostile peer can ask any node for any chunk of an image it serves: this
   * bounds what it can make the node pull at a time (beyond it: dont-have, and the
   * child asks another parent).
   */
  maxFetchesForPeers: 32,
  /**
   * How long a parent asked for a digest it does not know yet waits to learn it. In a
   * burst a child can be ahead of its parent (the parent's catalogs still on their way):
   * the parent will know the chunk in a moment, and answering dont-have sent the child
   * to the origin.
   */
  locateWaitMs: 5000
} as const

/** Where the node's verified catalogs say a chunk is: a node serves only what a catalog vouches for. */
export interface ChunkLocator {
  locate (digest: Digest): ChunkRef | undefined
  /** Like `locate`, but waits (until `signal` aborts) for a catalog being opened to name the digest. */
  locateSoon (digest: Digest, signal: AbortSignal): Promise<ChunkRef | undefined>
  /** The chunks of PACK the catalogs name (for availability answers). */
  packChunks (pack: Digest): readonly ChunkRef[]
}

/** The node's chunks: what it holds, and its resolver for what it does not. */
export interface ChunkStore {
  /** The chunk's bytes if held (memory, then disk; the server hashes them again before sending), else undefined. Never fetches. */
  held (chunk: ChunkRef, signal: AbortSignal): Promise<Uint8Array | undefined>
  /** Whether the chunk is held (memory or disk), without reading it. */
  has (digest: Digest): boolean
  /** The chunk through the node's resolver (cache, its own peers, the origin), verified; once however many ask (singleflight). */
  fetch (chunk: ChunkRef, signal: AbortSignal): Promise<Uint8Array>
}

export interface NodeChunksOptions {
  locator: ChunkLocator
  store: ChunkStore
  /** Whether this node is itself asking peer FROM, as its parent, for DIGEST (PeerChunkSource.isAsking). */
  isAsking?: (digest: Digest, from: string) => boolean
  limits?: Partial<Record<keyof typeof SERVING_DEFAULTS, number>>
  /** Default: the system clock (the simulation model passes its own). */
  clock?: Clock
}

/**
 * What the chunk server serves (LocalChunks): a chunk a verified catalog vouches
 * for, from memory or disk; asked as a parent (`fetch`), fetched through the node's
 * own resolver within `maxFetchesForPeers`.
 */
export class NodeChunks implements LocalChunks {
  readonly limits: Record<keyof typeof SERVING_DEFAULTS, number>
  readonly stats = { fetchesForPeers: 0, fetchLimited: 0, notLocated: 0 }
  private readonly locator: ChunkLocator
  private readonly store: ChunkStore
  private readonly isAsking: (digest: Digest, from: string) => boolean
  private readonly clock: Clock

  constructor (options: NodeChunksOptions) {
    this.locator = options.locator
    this.store = options.store
    this.isAsking = options.isAsking ?? (() => false)
    this.limits = { ...SERVING_DEFAULTS, ...options.limits }
    this.clock = options.clock ?? systemClock
  }

  async get (digest: Digest, { signal, fetch, from }: { signal: AbortSignal, fetch: boolean, from: string }): Promise<Uint8Array | undefined> {
    const ref = fetch
      ? await this.locator.locateSoon(digest, AbortSignal.any([signal, this.clock.timeout(this.limits.locateWaitMs)]))
      : this.locator.locate(digest)
    if (ref === undefined) {
      this.stats.notLocated++
      return undefined
    }
    const held = await this.store.held(ref, signal)
    if (held !== undefined || !fetch) return held
    // We are asking this very peer for the chunk: fetching for it would wait on ourselves.
    if (this.isAsking(digest, from)) return undefined
    // As a parent in the chunk's tree: fetch it once (singleflight: a read of our own joins),
    // through our own parent or, at the root, the origin. Bounded, so that peers cannot make
    // this node pull any amount; beyond it they are told dont-have and try another parent.
    if (this.stats.fetchesForPeers >= this.limits.maxFetchesForPeers) {
      this.stats.fetchLimited++
      return undefined
    }
    this.stats.fetchesForPeers++
    try {
      return await this.store.fetch(ref, signal)
    } finally {
      this.stats.fetchesForPeers--
    }
  }

  compressible (digest: Digest): boolean {
    return this.locator.locate(digest)?.codec === Codec.zstd
  }

  async held (pack: Digest): Promise<readonly ByteRange[]> {
    const ranges: ByteRange[] = []
    for (const c of this.locator.packChunks(pack)) if (this.store.has(c.digest)) ranges.push({ offset: c.packOffset, length: c.storedLength })
    return ranges
  }
}

/** A ChunkStore over a resolver and its disk cache (the agent's, the hostile-peer test's victim). */
export function resolverStore (resolver: { memory: { get (digest: Digest): Uint8Array | undefined, has (digest: Digest): boolean }, get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array> }, disk: { get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined>, has (digest: Digest): boolean }): ChunkStore {
  return {
    held: async (chunk, signal) => resolver.memory.get(chunk.digest) ?? await disk.get(chunk, { signal }),
    has: digest => disk.has(digest) || resolver.memory.has(digest),
    fetch: async (chunk, signal) => await resolver.get(chunk, { signal })
  }
}
