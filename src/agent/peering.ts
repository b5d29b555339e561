import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import type { DiskCache } from '../cache/disk-cache.ts'
import type { ChunkSource } from '../fetch/chunk-source.ts'
import type { Logger } from '../util/log.ts'
import type { ChunkResolver } from '../fetch/resolver.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { Codec } from '../format/codec.ts'
import type { Digest } from '../oci/digest.ts'
import { ChunkClient } from '../p2p/chunk-client.ts'
import type { ByteRange } from '../p2p/chunk-protocol.ts'
import { ChunkServer, type ChunkServerStats, type LocalChunks } from '../p2p/chunk-server.ts'
import { createPeerNode, loadOrCreatePsk, type PeerNode } from '../p2p/node.ts'
import { DhtPackRouter, type DhtPackRouterStats } from '../p2p/pack-router.ts'
import { PeerChunkSource, type PeerSourceStats } from '../p2p/peer-source.ts'
import { SwarmMembers } from '../p2p/swarm-members.ts'
import type { EventLoopLag } from '../p2p/loop-lag.ts'
import type { AgentConfig } from './config.ts'

/** Fetches this node makes at once on peers' behalf, as their parent in a chunk's tree. */
const MAX_FETCHES_FOR_PEERS = 32

/** Where the agent's mounted images say a chunk is: the peer server serves only what a catalog vouches for. */
export interface ChunkLocator {
  locate (digest: Digest): ChunkRef | undefined
  /** Like `locate`, but waits (until `signal` aborts) for a mount in progress to learn the digest. */
  locateSoon (digest: Digest, signal: AbortSignal): Promise<ChunkRef | undefined>
  packChunks (pack: Digest): ChunkRef[]
}

/**
 * How long a parent asked for a digest it does not know yet waits to learn it. In a
 * burst a child can be ahead of its parent (the parent's catalogs still on their way):
 * the parent will know the chunk in a moment, and answering dont-have sent the child
 * to the origin.
 */
const LOCATE_WAIT_MS = 5000

export interface PeeringStats {
  peerId: string
  multiaddrs: string[]
  connectedPeers: number
  source: Omit<PeerSourceStats, 'perPeerBytes'> & { perPeerBytes: Record<string, number> }
  server: ChunkServerStats
  /** DHT provides and walks (swarm keys: one per layer, one per image's metadata). */
  router: DhtPackRouterStats
}

/**
 * The agent's place in the swarm: a libp2p node, a server for the chunks this
 * node holds (verified, from its caches) and a chunk source that asks peers. The
 * agent joins an image's swarms (one per layer, one for its metadata) as its mount
 * learns them, telling connected peers at once and the DHT a little later, so a
 * burst of nodes starting together finds itself through peer exchange.
 */
export class Peering {
  readonly node: PeerNode
  readonly source: ChunkSource
  private readonly peers: PeerChunkSource
  private readonly server: ChunkServer
  private readonly router: DhtPackRouter
  private readonly client: ChunkClient
  private readonly members: SwarmMembers
  private readonly announced = new Set<Digest>()
  /** Pack (or whole blob) → the DHT key its swarm announces under. */
  private readonly swarmKeys: Map<Digest, Digest>
  private readonly lifetime = new AbortController()
  private readonly log: Logger

  private constructor (parts: { node: PeerNode, peers: PeerChunkSource, server: ChunkServer, router: DhtPackRouter, client: ChunkClient, members: SwarmMembers, swarmKeys: Map<Digest, Digest> }, log: Logger) {
    this.node = parts.node
    this.members = parts.members
    this.swarmKeys = parts.swarmKeys
    this.node.libp2p.addEventListener('peer:connect', this.onConnect)
    this.peers = parts.peers
    this.server = parts.server
    this.router = parts.router
    this.client = parts.client
    this.log = log
    this.source = {
      name: 'peers',
      get: async (chunk, options) => {
        this.announce([this.swarmOf(chunk.pack)])
        // Alone (no connection at all): nobody can answer, so do not make the read wait for a lookup.
        if (this.node.connectedPeers().length === 0) return undefined
        return await this.peers.get(chunk, options)
      }
    }
  }

  /**
   * Joins the swarm of `key` (a layer's catalog digest, or an image's manifest digest)
   * for these packs and blobs: tells the DHT and the connected peers (JOIN) that this
   * node wants (and will hold) them. The
   * agent calls it at mount, before the first read: in a burst, every node's
   * announcement is then in the DHT by the time the others look for the swarm, so they
   * agree on each chunk's tree instead of each finding itself alone and going to the
   * origin. One key per layer, not per pack: every key costs a provide and walks.
   */
  join (key: Digest, packs: Iterable<Digest>): void {
    for (const pack of packs) if (!this.swarmKeys.has(pack)) this.swarmKeys.set(pack, key)
    this.announce([key])
  }

  private swarmOf (pack: Digest): Digest {
    return this.swarmKeys.get(pack) ?? pack
  }

  private announce (keys: Iterable<Digest>): void {
    const added: Digest[] = []
    for (const key of keys) {
      if (this.announced.has(key)) continue
      this.announced.add(key)
      // Kept for good; swarms heard of for others are a bounded, expiring few (SwarmMembers).
      this.members.own(key)
      added.push(key)
      this.router.announce(key, { signal: this.lifetime.signal }).catch((err: Error) => this.log.debug({ key, err: err.message }, 'announce failed (retried while held)'))
    }
    // The peers we are connected to hear it at once (JOIN) and pass it on; the DHT record reaches the rest.
    if (added.length > 0) for (const peer of this.node.connectedPeers()) this.client.join(peer, added, this.node.multiaddrs())
  }

  /** A new connection hears every swarm we are in whose members we would like to hear more of. */
  private readonly onConnect = (event: CustomEvent<PeerId>): void => {
    const keys = [...this.announced].filter(key => this.members.wantsMore(key))
    if (keys.length > 0) this.client.join(event.detail, keys, this.node.multiaddrs())
  }

  /**
   * Starts the node and its server. `resolver` is read lazily: the resolver is built
   * with this node's chunk source, and the server needs the resolver for fetches on children's behalf.
   */
  static async start (config: AgentConfig, deps: { disk: DiskCache, resolver: () => ChunkResolver, locator: ChunkLocator, log: Logger, lag: EventLoopLag }): Promise<Peering> {
    const psk = config.p2p.pskFile !== undefined ? await loadOrCreatePsk(config.p2p.pskFile) : undefined
    const node = await createPeerNode({
      stateDir: config.stateDir,
      listen: config.p2p.listen,
      bootstrap: config.p2p.peers,
      ...(psk !== undefined ? { psk } : {})
    })
    let fetchesForPeers = 0
    const local: LocalChunks = {
      get: async (digest, { signal, fetch, from }) => {
        const ref = fetch
          ? await deps.locator.locateSoon(digest, AbortSignal.any([signal, AbortSignal.timeout(LOCATE_WAIT_MS)]))
          : deps.locator.locate(digest)
        if (ref === undefined) return undefined
        const resolver = deps.resolver()
        const held = resolver.memory.get(digest) ?? await deps.disk.get(ref, { signal })
        if (held !== undefined || !fetch) return held
        // We are asking this very peer for the chunk: fetching for it would wait on ourselves.
        if (peers.isAsking(digest, from)) return undefined
        // As a parent in the chunk's tree: fetch it once (singleflight: a read of our own joins),
        // through our own parent or, at the root, the origin. Bounded, so that peers cannot make
        // this node pull any amount; beyond it they are told dont-have and try another parent.
        if (fetchesForPeers >= MAX_FETCHES_FOR_PEERS) return undefined
        fetchesForPeers++
        try {
          return await resolver.get(ref, { signal })
        } finally {
          fetchesForPeers--
        }
      },
      compressible: digest => deps.locator.locate(digest)?.codec === Codec.zstd,
      held: async (pack) => {
        const ranges: ByteRange[] = []
        for (const c of deps.locator.packChunks(pack)) {
          if (deps.disk.has(c.digest) || deps.resolver().memory.has(c.digest)) ranges.push({ offset: c.packOffset, length: c.storedLength })
        }
        return ranges
      }
    }
    const members = new SwarmMembers()
    const server = new ChunkServer(node.libp2p, { local, members, ...(config.p2p.uploadBytesPerSecond !== undefined ? { uploadBytesPerSecond: config.p2p.uploadBytesPerSecond } : {}) })
    await server.start()
    // Provides wait 5-15 s: in a burst, peer exchange finds the swarm, and DHT traffic at
    // the start (every provide reaches every node of a small cluster) was CPU the reads needed.
    const router = new DhtPackRouter(node.libp2p, { members, provideDelayMs: () => 5000 + Math.random() * 10_000 })
    const self = node.peerId.toString()
    const client = new ChunkClient(node.libp2p, {
      // Members a peer passed on: remember where they listen, so that asking one dials it.
      onMembers: (key, heard) => {
        // Only swarms we joined: a peer pushing members of any key would grow our members and peer store without bound.
        if (!members.isOwn(key)) return
        for (const member of heard) {
          if (member.id === self) continue
          try {
            const peer = peerIdFromString(member.id)
            // Peer-store merges are costly (a profile counted hundreds per agent in a burst): only
            // for members new to us that we are not connected to.
            if (!members.add(key, peer, member.addresses) || node.libp2p.getConnections(peer).length > 0) continue
            const multiaddrs = member.addresses.flatMap(a => { try { return [multiaddr(a)] } catch { return [] } })
            if (multiaddrs.length > 0) void node.libp2p.peerStore.merge(peer, { multiaddrs }).catch(() => {})
          } catch {
            // not a peer id: ignore the entry
          }
        }
      }
    })
    const swarmKeys = new Map<Digest, Digest>()
    const peers = new PeerChunkSource({
      self: node.peerId,
      router,
      client,
      bans: node.bans,
      swarmOf: pack => swarmKeys.get(pack) ?? pack,
      lag: () => deps.lag.recentMs(),
      chunkTimeoutMs: config.chunkTimeoutMs
    })
    deps.log.info({ peerId: node.peerId.toString(), multiaddrs: node.multiaddrs() }, 'peer node started')
    return new Peering({ node, peers, server, router, client, members, swarmKeys }, deps.log)
  }

  stats (): PeeringStats {
    const { perPeerBytes, ...source } = this.peers.stats
    return {
      peerId: this.node.peerId.toString(),
      multiaddrs: this.node.multiaddrs(),
      connectedPeers: this.node.connectedPeers().length,
      source: { ...source, perPeerBytes: Object.fromEntries(perPeerBytes) },
      server: { ...this.server.stats },
      router: { ...this.router.stats }
    }
  }

  async stop (): Promise<void> {
    this.node.libp2p.removeEventListener('peer:connect', this.onConnect)
    this.lifetime.abort()
    this.router.stop()
    this.client.close()
    await this.server.stop()
    await this.node.stop()
  }
}
