import type { PeerId } from '@libp2p/interface'
import type { ChunkSource } from '../fetch/chunk-source.ts'
import type { Logger } from '../util/log.ts'
import type { Digest } from '../oci/digest.ts'
import { ChunkClient } from '../p2p/chunk-client.ts'
import { ChunkServer, type ChunkServerStats } from '../p2p/chunk-server.ts'
import { NodeChunks, type ChunkLocator, type ChunkStore } from '../p2p/local-chunks.ts'
import { multiaddr, peerIdFromString } from '../p2p/libp2p.ts'
import { createPeerNode, loadOrCreatePsk, type PeerNode } from '../p2p/node.ts'
import { DhtPackRouter, PACK_ROUTER_DEFAULTS, type DhtPackRouterStats } from '../p2p/pack-router.ts'
import { PeerChunkSource, type PeerSourceStats } from '../p2p/peer-source.ts'
import { SwarmMembers } from '../p2p/swarm-members.ts'
import type { EventLoopLag } from '../p2p/loop-lag.ts'
import type { AgentConfig } from './config.ts'

/** The server's stats before `serve`. */
const NOT_SERVING: ChunkServerStats = {
  requests: 0, served: 0, bytesServed: 0, dontHave: 0, busy: 0, pending: 0, parentRequests: 0, localCorruption: 0, violations: 0,
  busyAllPeers: 0, busyQueueFull: 0, haveLimited: 0, throttled: 0, overRate: 0, readsPaused: 0, stalled: 0, queuedBytes: 0, inProgress: 0
}

export interface PeeringStats {
  peerId: string
  multiaddrs: string[]
  connectedPeers: number
  source: Omit<PeerSourceStats, 'perPeerBytes'> & { perPeerBytes: Record<string, number> }
  server: ChunkServerStats
  /** The serving policy (NodeChunks): fetches in progress for peers, parent requests refused over the limit, requests for digests no catalog names. */
  serving: NodeChunks['stats']
  /** DHT provides and walks (swarm keys: one per layer, one per image's metadata). */
  router: DhtPackRouterStats
}

/**
 * The agent's place in the swarm: a libp2p node, a chunk source that asks peers,
 * and (from `serve` on) a server for the chunks this node holds. The
 * agent joins an image's swarms (one per layer, one for its metadata) as its mount
 * learns them, telling connected peers at once and the DHT a little later, so a
 * burst of nodes starting together finds itself through peer exchange.
 */
export class Peering {
  readonly node: PeerNode
  readonly source: ChunkSource
  private readonly peers: PeerChunkSource
  private server: ChunkServer | undefined
  private serving: NodeChunks | undefined
  private serverStopped = false
  private readonly locator: ChunkLocator
  private readonly uploadBytesPerSecond: number | undefined
  private readonly router: DhtPackRouter
  private readonly client: ChunkClient
  private readonly members: SwarmMembers
  private readonly announced = new Set<Digest>()
  /** Pack (or whole blob) → the DHT key its swarm announces under. */
  private readonly swarmKeys: Map<Digest, Digest>
  private readonly lifetime = new AbortController()
  private readonly log: Logger

  private constructor (parts: { node: PeerNode, peers: PeerChunkSource, router: DhtPackRouter, client: ChunkClient, members: SwarmMembers, swarmKeys: Map<Digest, Digest>, locator: ChunkLocator, uploadBytesPerSecond: number | undefined }, log: Logger) {
    this.node = parts.node
    this.members = parts.members
    this.swarmKeys = parts.swarmKeys
    this.node.libp2p.addEventListener('peer:connect', this.onConnect)
    this.peers = parts.peers
    this.locator = parts.locator
    this.uploadBytesPerSecond = parts.uploadBytesPerSecond
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
   * Starts the libp2p node and the chunk source that asks peers; serving them
   * starts with `serve`, once the resolver built with this source exists (the server
   * fetches through it on children's behalf). LOCATOR says what this node may serve.
   */
  static async start (config: AgentConfig, deps: { locator: ChunkLocator, log: Logger, lag: EventLoopLag }): Promise<Peering> {
    const psk = config.p2p.pskFile !== undefined ? await loadOrCreatePsk(config.p2p.pskFile) : undefined
    const node = await createPeerNode({
      stateDir: config.stateDir,
      listen: config.p2p.listen,
      bootstrap: config.p2p.peers,
      ...(psk !== undefined ? { psk } : {})
    })
    try {
      return Peering.assemble(config, node, deps)
    } catch (err) {
      await node.stop()
      throw err
    }
  }

  private static assemble (config: AgentConfig, node: PeerNode, deps: { locator: ChunkLocator, log: Logger, lag: EventLoopLag }): Peering {
    const members = new SwarmMembers()
    // Provides wait 60-90 s: in a burst, peer exchange finds the swarm, and DHT traffic
    // during it (every provide reaches every node of a small cluster) was CPU the reads needed
    // (at 5-15 s they landed mid-burst: docs/BENCHMARKS.md, 2026-12-06).
    const router = new DhtPackRouter(node.libp2p, { members, provideDelayMs: () => PACK_ROUTER_DEFAULTS.provideDelayMs.min + Math.random() * (PACK_ROUTER_DEFAULTS.provideDelayMs.max - PACK_ROUTER_DEFAULTS.provideDelayMs.min) })
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
      chunkTimeoutMs: config.chunkTimeoutMs,
      connected: () => node.connectedPeers()
    })
    deps.log.info({ peerId: node.peerId.toString(), multiaddrs: node.multiaddrs() }, 'peer node started')
    return new Peering({ node, peers, router, client, members, swarmKeys, locator: deps.locator, uploadBytesPerSecond: config.p2p.uploadBytesPerSecond }, deps.log)
  }

  /**
   * Serves peers the chunks LOCATOR vouches for, from STORE (memory, disk, and its
   * resolver for parent requests): the serving policy is NodeChunks
   * (src/p2p/local-chunks.ts). Once; stopped by `stop`.
   */
  async serve (store: ChunkStore): Promise<void> {
    if (this.server !== undefined) throw new Error('this node serves its peers already')
    const local = new NodeChunks({ locator: this.locator, store, isAsking: (digest, from) => this.peers.isAsking(digest, from) })
    const server = new ChunkServer(this.node.libp2p, { local, members: this.members, ...(this.uploadBytesPerSecond !== undefined ? { uploadBytesPerSecond: this.uploadBytesPerSecond } : {}) })
    await server.start()
    this.server = server
    this.serving = local
  }

  /** Stops serving peers (the chunk server; the node and the peer source stay up until `stop`). Idempotent. */
  async stopServing (): Promise<void> {
    if (this.server === undefined || this.serverStopped) return
    this.serverStopped = true
    await this.server.stop()
  }

  stats (): PeeringStats {
    const { perPeerBytes, ...source } = this.peers.stats
    return {
      peerId: this.node.peerId.toString(),
      multiaddrs: this.node.multiaddrs(),
      connectedPeers: this.node.connectedPeers().length,
      source: { ...source, perPeerBytes: Object.fromEntries(perPeerBytes) },
      server: { ...(this.server?.stats ?? NOT_SERVING) },
      serving: { ...(this.serving?.stats ?? { fetchesForPeers: 0, fetchLimited: 0, notLocated: 0 }) },
      router: { ...this.router.stats }
    }
  }

  async stop (): Promise<void> {
    this.node.libp2p.removeEventListener('peer:connect', this.onConnect)
    this.lifetime.abort()
    this.router.stop()
    this.client.close()
    await this.stopServing()
    await this.node.stop()
  }
}
