/**
 * The model's cluster: nodes that run the agent's read path in simulated time.
 *
 * RUN, not restated: every node has a real `PeerChunkSource` (src/p2p/peer-source.ts)
 * with its own `PeerBans`, on the simulator's clock (src/util/clock.ts), so the
 * swarm and availability steps, holder racing and hedging, the distribution
 * tree (`selectSources`, src/p2p/rendezvous.ts), parent re-asks after `pending`,
 * suspicion, bans and every timeout are the agent's own code and numbers
 * (PEER_SOURCE_DEFAULTS). Simulated nodes are its PeerIds (it only calls
 * toString() on them and hands them back); all nodes' sources share one
 * peer-key cache (see World.peerKeys). Each node also keeps its swarm members
 * in a real SwarmMembers (src/p2p/swarm-members.ts). Each node's reads go
 * through a real `ChunkResolver` (src/fetch/resolver.ts: singleflight, passes
 * over [peers, origin] with their pauses, the chunk timeout, a resolution
 * aborted when all its callers leave) over a NodeCache (the disk cache: which
 * chunks it holds); a failed read is retried once (the kernel does that for
 * FUSE) before the workload sees EIO. What it serves is decided by the real
 * `NodeChunks` (src/p2p/local-chunks.ts: what the mount vouches for, waiting
 * up to locateWaitMs for it to learn a digest, fetching for children through
 * the resolver within maxFetchesForPeers) and the chunk server's real
 * admission (`admitWant`, src/p2p/chunk-server.ts). Origin requests run under
 * a real `RetryingRequests` (src/http/http-retry.ts: retries, equal-jitter
 * backoff, requests in flight). Around them, the model plugs in:
 *
 * - a ChunkRequester (ChunkClient's job): a want or HAVE travels the link
 *   latency, costs the serving node requestOverheadMs of CPU, runs the server
 *   side below on that node, and a chunk comes back over the sender's uplink and
 *   the receiver's downlink, as stored (zstd) when its image stored it
 *   compressed, else raw (see wireBytes). Cancelling (the requester's
 *   signal) reaches the server at once; a chunk already being sent arrives
 *   anyway, unwaited. A dead node's connections fail at once (as a reset stream
 *   does) and new requests to it are refused after the latency; disconnect (on
 *   a ban) fails the requests in flight to that peer. No bytes move: data is a
 *   shared placeholder, and `verify` accepts an honest node's and rejects a bad
 *   peer's.
 * - a PackRouter (DhtPackRouter's job, over a cost model of kad-dht): a key is
 *   provided once, after Peering's delay of 60-90 s, and visible to walks once
 *   the provide's work is done (announceMs); a walk costs lookupMs and finds every node whose record has
 *   landed by its end, never self (kad-dht's walk ends at the first record
 *   holder's answer, which lists every provider it holds, not 20). One walk per
 *   key at a time, fresh for lookupCacheMs (1 s if it found nobody and no
 *   member told us of itself). An answer lists first the members peers told
 *   this node of (JOIN and MEMBERS, below), then the walk's. During a key's
 *   first walk the answer is the members heard of so far (the model's walk
 *   finds nothing before it ends), settled once there is one (as src: a read
 *   does not wait for the walk then). As src, a key's first walk is not made
 *   when members told the node of themselves before it, and ends (before its
 *   next RPC) once they do. After that a caller gets
 *   the last answer at once while a stale one is refreshed in the background
 *   (stale-while-revalidate, as src). Each walk and provide also costs dhtRpcMs
 *   of CPU per DHT peer it talks to (the k = 20 closest, or all nodes in a
 *   smaller cluster), and libp2p's upkeep costs each node upkeepMsPerPeer of CPU
 *   per second per connected peer (up to 20), so that on shared cores a DHT
 *   storm slows everything down, as it does in real runs.
 *
 * RESTATED (their code is wired to libp2p streams, HTTP, SQLite or FUSE), with
 * their numbers imported from src (CHUNK_SERVER_DEFAULTS, PACK_ROUTER_DEFAULTS,
 * PEER_EXCHANGE), none restated:
 *
 * - Peering and the chunk server's peer exchange: swarm keys (Peering.join):
 *   the image's metadata blobs and its layers' catalogs are in the swarm of its
 *   manifest digest, a layer's packs in the swarm of the catalog's digest; a key is
 *   announced when first joined (a DHT provide, and a JOIN to every connected
 *   peer), and a read announces its pack's key again (a no-op by then). A new
 *   connection JOINs each side to the other with every key it announced while
 *   its view of that swarm is small (SwarmMembers.wantsMore). A
 *   node that receives a JOIN answers and passes it on as its real
 *   SwarmMembers.exchange says (src/p2p/swarm-members.ts: the 32 most recently
 *   heard and the core; 8 of those, if they have a JOIN stream open to it, hear
 *   of the joiner); what a node hears is kept there too (the dead stay listed).
 *   Each message takes the link latency. Connections: before the burst each
 *   node is connected to nodes 0 and 1 (everyone bootstraps from them, as
 *   cluster.ts runs it) and to 20 others (kad-dht's self-walk; random ones
 *   here); every request then connects its two ends; death and bans close
 *   them. libp2p's limit of 300 connections is not modelled.
 * - ChunkServer's transport (SERVER): a want admitted by `admitWant` is looked up
 *   in NodeChunks; a parent request (fetch flag) is answered with data when the
 *   fetch lands, or `pending` after min(waitMs, 5 s) while it runs on (the
 *   requester's CANCEL reaches it only until then); a chunk goes back as stored
 *   (below). HAVE answers the byte ranges of the pack it holds (NodeChunks.held),
 *   without the admission src applies to HAVEs. A node vouches for what the
 *   agent's ChunkIndex.locate would: a whole blob (metadata or catalog) from the
 *   moment its own fetch of it starts, an image chunk once its catalogs are open
 *   (before the FUSE mount). Bad peers (simulations/lib/bad-peer.ts) announce the
 *   image's packs, layer keys and manifest key and JOIN the peers they meet,
 *   ignore JOINs, claim whole packs, and answer every want for an image chunk
 *   with bad bytes, with no limits.
 * - HttpOrigin's attempt (HTTP; RetryingRequests.once works on HTTP responses):
 *   an attempt fails after requestTimeoutMs without progress (no response yet,
 *   or body bytes slower than a TCP segment per requestTimeoutMs: see Watchdog);
 *   the origin sends stored (compressed) bytes through its capped link.
 * - The mount (Agent.mount, loadImage, openImageView): two tag lookups from the
 *   origin; the manifest, signature manifest, signature envelope and config one
 *   after another, then every layer's catalog at once, each a whole blob through
 *   the resolver (so through peers); the layers' swarms joined; catalogs opened
 *   for serving; mountMs of CPU. Then the workload: the profile's chunks in
 *   order, readWindow at a time, and its own CPU (workloadCpuMs in all) spread
 *   over the chunks, one think at a time. (A recorded profile has the
 *   metadata's total bytes and requests, not each blob, nor which layer a pack
 *   is in: see mountPlan.)
 *
 * CPU (each node its own core, or --shared-cores N for all): requestOverheadMs
 * per want or HAVE at the node that serves it and per origin request at the
 * node that sends it; cpuMsPerMB per chunk received (verifying, decompressing)
 * and per chunk sent; DHT walks and provides; upkeep; mount; the workload.
 * Not charged: the peer source's own work (ranking the swarm for each chunk).
 */
import type { PeerId } from '@libp2p/interface'
import { createHash } from 'node:crypto'
import { OriginError } from '../../src/errors.ts'
import type { ChunkCache, ChunkSource } from '../../src/fetch/chunk-source.ts'
import { ChunkUnavailableError } from '../../src/fetch/errors.ts'
import { MOUNT_FETCH_DEFAULTS } from '../../src/agent/constants.ts'
import { RESOLVER_DEFAULTS } from '../../src/fetch/constants.ts'
import { ChunkResolver } from '../../src/fetch/resolver.ts'
import { Codec } from '../../src/format/codec.ts'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { RETRY_DEFAULTS, RetryingRequests } from '../../src/http/http-retry.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { PeerBans } from '../../src/p2p/bans.ts'
import type { ChunkReply, ChunkRequester, WantOptions } from '../../src/p2p/chunk-client.ts'
import { MAX_JOIN_KEYS, MAX_MEMBERS, normalizeRanges, type ByteRange } from '../../src/p2p/chunk-protocol.ts'
import { admitWant, CHUNK_SERVER_DEFAULTS } from '../../src/p2p/chunk-server.ts'
import { PeerUnavailableError } from '../../src/p2p/errors.ts'
import { NodeChunks, resolverStore, SERVING_DEFAULTS, type ChunkLocator } from '../../src/p2p/local-chunks.ts'
import { PACK_ROUTER_DEFAULTS, type PackRouter, type SwarmAnswer } from '../../src/p2p/pack-router.ts'
import { PeerChunkSource, PeerKeys, type PeerSourceStats } from '../../src/p2p/peer-source.ts'
import { PEER_SOURCE_DEFAULTS } from '../../src/p2p/peer-source-defaults.ts'
import { CORE_SHARE, LARGE_SWARM, nodeKey, type NodeKey } from '../../src/p2p/rendezvous.ts'
import type { Clock } from '../../src/util/clock.ts'
import { PEER_EXCHANGE, SwarmMembers } from '../../src/p2p/swarm-members.ts'
import type { ClusterResult, NodeResult, OriginSample } from './cluster.ts'
import { makeCpu, type Cpu } from './cpu.ts'
import { deferred, Simulator, TimeoutError } from './des.ts'
import type { WorkloadProfile } from './image.ts'
import { Link, Transfer } from './links.ts'
import { arrivalTimes, countOf, killedNodes, mbitToBytes, seededRandom, type ModelParams, type Scenario } from './scenario.ts'

/** The chunk server's admission, as src sets it. */
const SERVER = CHUNK_SERVER_DEFAULTS
const SAMPLE_MS = 250

/**
 * No bytes move: what an honest node sends (or the origin) is a view of the right
 * length into one shared buffer, what a bad peer sends a view into another, and the
 * checks (the resolver's and the peer source's) tell them apart by the buffer.
 */
const goodBuffers = new WeakSet<ArrayBufferLike>()
let good = new Uint8Array(0)
let bad = new Uint8Array(0)
function bytesOf (chunk: ChunkRef, honest: boolean): Uint8Array {
  if (chunk.length > good.length) {
    good = new Uint8Array(chunk.length * 2)
    bad = new Uint8Array(chunk.length * 2)
    goodBuffers.add(good.buffer)
  }
  return (honest ? good : bad).subarray(0, chunk.length)
}
const verify = (_chunk: ChunkRef, bytes: Uint8Array): boolean => goodBuffers.has(bytes.buffer)
const verifyProblem = (chunk: ChunkRef, bytes: Uint8Array): string | undefined => verify(chunk, bytes) ? undefined : 'a bad peer\'s bytes'

export type ModelMode = 'peers' | 'baseline' | 'lone'

export interface ModelOptions {
  scenario: Scenario
  profile: WorkloadProfile
  mode: ModelMode
  /** Called about every 10 s of wall time while a run lasts: a 10,000-node run takes minutes. */
  onProgress?: (progress: ModelProgress) => void
}

export interface ModelProgress { simulatedMs: number, events: number, finished: number, nodes: number, wallSeconds: number }

/** A chunk as the agent's catalogs describe it (what PeerChunkSource.get takes), plus what the model needs. */
interface Chunk extends ChunkRef {
  /** A whole blob as a chunk of its own: image metadata (manifest, signature, config) or a catalog. The origin counts it as metadata. */
  blob: boolean
}

/**
 * What a mount fetches: TAGS tag lookups of TAGBYTES each from the origin, the
 * image's metadata blobs one after another (in the swarm of MANIFEST, the first
 * of them) and then its layers' catalogs all at once (in the same swarm; each
 * catalog's digest is the swarm key of its layer's packs), all through the resolver.
 */
interface MountPlan { tags: number, tagBytes: number, manifest: Digest, metadata: Chunk[], layers: Array<{ catalog: Digest, blob: Chunk, packs: Digest[] }> }

/** A want or HAVE in progress, so that a node's death or a disconnect can fail it. */
interface Call { target: Node, fail: (err: Error) => void }

class PeerGone extends Error {}

/** How the policy behaved, beyond what the report shows (peers runs only). */
export interface PolicyDiagnostics {
  /** PeerChunkSource stats summed over the nodes (perPeerBytes left out). */
  source: Omit<PeerSourceStats, 'perPeerBytes'>
  /** Server side: requests, and what they were answered. */
  server: {
    wants: number, haves: number, parentRequests: number, busyPerPeer: number, busyHolderPeers: number, busyAllPeers: number, pending: number, served: number
    /**
     * Of which: for a chunk this node did not vouch for yet (even after waiting 5 s for
     * a parent request; of those, image chunks before its catalogs were open), and for
     * one its fetch for the child failed or was refused (fetchLimit: beyond 32 fetches
     * for peers).
     */
    dontHave: number, dontHaveNotVouched: number, dontHaveNotMounted: number, dontHaveFetchFailed: number, fetchLimit: number
  }
  /**
   * Image chunks from the origin, by what the resolver's last peer attempt did:
   * asked no parent (the node was the chunk's root in its view of the swarm, or
   * its budget ran out before), or asked parents and got nothing in time.
   */
  originChunks: { noParentAsked: number, parentsFailed: number }
  /** Whole blobs (metadata and catalogs) from the origin, the same way. */
  originBlobs: { noParentAsked: number, parentsFailed: number }
  /** Origin attempts that failed (their bytes count as origin egress all the same): the caller gave up (the chunk timeout), no progress for 10 s, or refused. */
  originFailures: { cancelled: number, stalled: number, refused: number }
  /** Hops from the origin of each image chunk a node got from a peer (1: from the root), by depth. */
  depth: { histogram: number[], mean: number, max: number }
  /** Simulated ms in PeerChunkSource.get for image chunks, for gets that returned the chunk and gets that did not. */
  peerGetMs: { hits: number, hitP50: number, hitP99: number, misses: number, missP50: number, missP99: number }
  /**
   * DHT walks started; holders() calls answered with the previous walk's answer
   * while a new one ran; first walks not started, and first walks stopped, because
   * members had told the node of themselves.
   */
  dht: { walks: number, staleAnswers: number, walksSkipped: number, walksStopped: number }
}

/** The shared parts: clock, origin, provider records, parameters. */
class World {
  readonly sim = new Simulator()
  readonly clock: Clock
  readonly p: ModelParams & { workloadCpuMs: number }
  readonly s: Scenario
  readonly peers: boolean
  readonly origin: Link
  originAlive = true
  readonly originStats = { requests: 0, packBytes: 0, metadataBytes: 0, metadataRequests: 0 }
  /** Nodes whose announce of a pack has landed, by pack, in landing order (append-only: a lookup keeps a length). */
  private readonly providers = new Map<string, { nodes: Node[], index: Map<Node, number> }>()
  readonly packChunks = new Map<string, Chunk[]>()
  readonly chunks = new Map<Digest, Chunk>()
  readonly sharedCpu: Cpu | undefined
  readonly random: () => number
  /** The DHT peers a walk or provide talks to: the k = 20 closest, or everyone in a smaller cluster. */
  readonly dhtPeers: number
  /** CPU of the RPCs in one DHT walk or provide: one per peer among the k = 20 closest. */
  readonly dhtRpcCost: number
  /**
   * One peer-key cache for every node's PeerChunkSource: all nodes derive the
   * same key from the same id, so sharing it changes nothing but memory (10,000
   * nodes that each see a 10,000-node swarm would hold 10^8 entries).
   */
  readonly peerKeys = new PeerKeys()
  readonly nodesById = new Map<string, Node>()
  readonly diagnostics: PolicyDiagnostics = {
    source: { hits: 0, misses: 0, direct: 0, roots: 0, bytesFromPeers: 0, verificationFailures: 0, protocolViolations: 0, bans: 0, badPeers: 0, parentRequests: 0, hedges: 0, timeouts: 0, parentTimeouts: 0, outOfTime: 0, busy: 0, dontHave: 0, pending: 0 },
    server: { wants: 0, haves: 0, parentRequests: 0, busyPerPeer: 0, busyHolderPeers: 0, busyAllPeers: 0, pending: 0, served: 0, dontHave: 0, dontHaveNotVouched: 0, dontHaveNotMounted: 0, dontHaveFetchFailed: 0, fetchLimit: 0 },
    originChunks: { noParentAsked: 0, parentsFailed: 0 },
    originBlobs: { noParentAsked: 0, parentsFailed: 0 },
    originFailures: { cancelled: 0, stalled: 0, refused: 0 },
    depth: { histogram: [], mean: 0, max: 0 },
    peerGetMs: { hits: 0, hitP50: 0, hitP99: 0, misses: 0, missP50: 0, missP99: 0 },
    dht: { walks: 0, staleAnswers: 0, walksSkipped: 0, walksStopped: 0 }
  }

  readonly peerGetHits: number[] = []
  readonly peerGetMisses: number[] = []

  constructor (options: ModelOptions) {
    this.s = options.scenario
    this.p = { ...options.scenario.model, workloadCpuMs: options.scenario.model.workloadCpuMs ?? options.profile.lone.warmMs }
    this.peers = options.mode === 'peers'
    this.origin = new Link(this.sim, 'origin', mbitToBytes(this.s.origin.mbit))
    this.sharedCpu = this.p.sharedCores > 0 ? makeCpu(this.sim, this.p.sharedCores) : undefined
    this.random = seededRandom(this.s.seed + 2)
    this.dhtPeers = Math.min(20, this.s.nodes - 1)
    this.dhtRpcCost = this.p.dhtRpcMs * this.dhtPeers
    const sim = this.sim
    this.clock = { now: () => sim.now, sleep: async (ms, signal) => await sim.sleep(ms, signal), timeout: ms => sim.timeout(ms) }
  }

  /** The machine's shared cores (calibration against a real run), or a core of the node's own. */
  cpu (): Cpu {
    return this.sharedCpu ?? makeCpu(this.sim, 1)
  }

  /**
   * A connection between A and B (if the gaters let it): each side JOINs the
   * other with the swarms it would hear more members of (Peering.onConnect;
   * bad-peer.ts JOINs all it is in).
   */
  connect (a: Node, b: Node): void {
    if (a === b || a.connections.has(b) || !a.admits(b) || !b.admits(a)) return
    a.connections.add(b)
    b.connections.add(a)
    for (const [from, to] of [[a, b], [b, a]] as const) {
      const keys = from.joinOnConnect()
      if (keys.length > 0) this.join(from, to, keys)
    }
  }

  /** FROM tells TO it is in these swarms: a JOIN, one link latency on its way. */
  join (from: Node, to: Node, keys: Digest[]): void {
    this.deliver(() => { if (to.connections.has(from)) to.joined(from, keys) })
  }

  /** FROM tells TO about these members of KEY's swarm (MEMBERS), one link latency on its way. */
  members (from: Node, to: Node, key: Digest, ids: readonly string[]): void {
    this.deliver(() => { if (to.connections.has(from)) to.heard(key, ids) })
  }

  /** A node by its peer id (what MEMBERS messages carry). */
  node (id: string): Node | undefined {
    return this.nodesById.get(id)
  }

  private deliver (fn: () => void): void {
    const latency = this.s.links.latencyMs
    if (latency === 0) fn()
    else this.sim.at(this.sim.now + latency, fn)
  }

  /** NODE's provider record for PACK has landed. */
  provide (pack: string, node: Node): void {
    let entry = this.providers.get(pack)
    if (entry === undefined) this.providers.set(pack, entry = { nodes: [], index: new Map() })
    if (entry.index.has(node)) return
    entry.index.set(node, entry.nodes.length)
    entry.nodes.push(node)
  }

  /** Whether SWARM (a walk's answer for PACK) lists NODE. */
  lists (pack: string, swarm: Swarm, node: Node): boolean {
    return (this.providers.get(pack)?.index.get(node) ?? Infinity) < swarm.count
  }

  /**
   * What a walk finds: every provider of PACK so far, as the shared (append-only)
   * array and how much of it is the answer, so 10,000 nodes do not each keep a
   * 10,000-long copy.
   */
  providersOf (pack: string): Swarm {
    const nodes = this.providers.get(pack)?.nodes ?? []
    return { nodes, count: nodes.length }
  }

  chunk (c: { digest: Digest, pack: Digest, packOffset: number, length: number, storedLength: number }, blob = false): Chunk {
    const chunk: Chunk = { digest: c.digest, pack: c.pack, packOffset: c.packOffset, length: c.length, storedLength: c.storedLength, codec: Codec.none, blob }
    let chunks = this.packChunks.get(c.pack)
    if (chunks === undefined) this.packChunks.set(c.pack, chunks = [])
    chunks.push(chunk)
    if (!this.chunks.has(c.digest)) this.chunks.set(c.digest, chunk)
    return chunk
  }

  /** A whole blob as a chunk of itself (the agent's wholeBlobChunk). */
  blob (digest: Digest, size: number): Chunk {
    return this.chunk({ digest, pack: digest, packOffset: 0, length: size, storedLength: size }, true)
  }
}

/** A walk's answer: the first COUNT of NODES. */
interface Swarm { nodes: readonly Node[], count: number }

/** One agent (and its workload). Implements NodeKey, and stands in for its own PeerId. */
class Node implements NodeKey {
  readonly id: string
  readonly a: number
  readonly b: number
  readonly index: number
  readonly up: Link
  readonly down: Link
  readonly bad: boolean
  alive = true
  /** Whole blobs this node serves (Agent.wholeBlobs): each from the moment its own fetch starts. */
  private readonly wholeBlobs = new Set<string>()
  /** The image's catalogs are open (Agent.openServingCatalogs): its chunks may be served. */
  private servingImage = false
  /** The chunks this node holds (its disk cache). */
  readonly cache = new NodeCache()
  readonly result: NodeResult
  /** The real peer source (peers mode only). */
  readonly source: PeerChunkSource | undefined
  /** The real resolver, over the cache, the peers (peers mode) and the origin. */
  private readonly resolver: ChunkResolver
  /** The real serving policy, over the resolver, the cache and this node's mount as its locator. */
  private readonly chunks: NodeChunks
  /** HttpOrigin's retries, backoff and bound on requests in flight (the real RetryingRequests; its attempts are the model's). */
  private readonly http: RetryingRequests
  readonly router: SimRouter
  readonly w: World
  private readonly cpu: Cpu
  /** Depth of a chunk a peer has just sent us, until the peer source returns it. */
  private readonly arriving = new Map<string, number>()
  /** Chunks whose last peer try found nothing, by what it did (for the diagnostics of an origin fetch that follows). */
  private readonly peerMisses = new Map<Digest, 'noParentAsked' | 'parentsFailed'>()
  /** Calls this node made, and calls made to it, still in progress. */
  private readonly outbound = new Set<Call>()
  private readonly inbound = new Set<Call>()
  /** Server side (admitWant's load): requests in progress by peer, holder requests in progress by peer, requests in progress in all. */
  private readonly active = new Map<Node, number>()
  private readonly holderActive = new Map<Node, number>()
  private activeAll = 0
  /** Parent requests waiting for the mount to learn a digest (ChunkIndex's locateSoon waiters). */
  private readonly locatorWaiters = new Set<() => void>()
  private thinking: Promise<void> = Promise.resolve()
  /** Pack (or whole blob) → the DHT key its swarm announces under (Peering.swarmKeys). */
  private readonly swarmKeys = new Map<Digest, Digest>()
  /** Swarm keys this node announced (Peering.announced): what it JOINs to every peer it connects to. */
  readonly announced = new Set<Digest>()
  /** Peers this node has a connection to (libp2p's). */
  readonly connections = new Set<Node>()
  /** Swarm members heard of from peers (the real SwarmMembers), and the peers whose JOIN stream to us is open (ChunkServer.joined). */
  private readonly members: SwarmMembers
  private readonly joinedUs = new Set<Node>()
  private readonly bans: PeerBans

  constructor (w: World, index: number, bad: boolean) {
    this.w = w
    this.index = index
    this.bad = bad
    // Peer-id-like names: the ids share a long prefix, as real ones do (nodeKey mixes for that).
    const key = nodeKey(`12D3KooW${(index * 2654435761 >>> 0).toString(36).padStart(8, '0')}${index.toString(36)}`)
    this.id = key.id
    this.a = key.a
    this.b = key.b
    const rate = mbitToBytes(w.s.links.mbit)
    this.up = new Link(w.sim, `${index} up`, rate)
    this.down = new Link(w.sim, `${index} down`, rate)
    this.cpu = w.cpu()
    this.result = { index, arrivalMs: 0, outcome: 'not-started', sources: {}, uploadBytes: 0, receivedFrom: {}, peerId: this.id, verificationFailures: 0, bannedPeers: 0, unavailableChunks: 0 }
    this.router = new SimRouter(w, this)
    this.bans = new PeerBans({ now: w.clock.now })
    this.members = new SwarmMembers({ keyOf: peer => w.peerKeys.of(peer), now: w.clock.now })
    w.nodesById.set(this.id, this)
    if (w.peers && !bad) {
      const source = new PeerChunkSource({
        self: this.peerId,
        router: this.router,
        client: new SimClient(this),
        bans: this.bans,
        clock: w.clock,
        verify,
        swarmOf: pack => this.swarmOf(pack),
        keys: w.peerKeys,
        chunkTimeoutMs: w.s.timeouts.chunkMs,
        connected: () => [...this.connections].map(n => n.peerId)
      })
      this.source = source
    }
    this.http = new RetryingRequests({}, { clock: w.clock, random: w.random })
    const origin: ChunkSource = { name: 'origin', get: async (chunk, { signal }) => await this.fromOrigin(chunk as Chunk, signal) }
    const peers: ChunkSource = { name: 'peers', get: async (chunk, { signal }) => await this.fromPeers(chunk as Chunk, signal) }
    this.resolver = new ChunkResolver({
      disk: this.cache,
      remote: this.source !== undefined ? [peers, origin] : [origin],
      timeoutMs: w.s.timeouts.chunkMs,
      clock: w.clock,
      verify: verifyProblem,
      onEvent: event => {
        if (event.type === 'resolved') this.resolved(event.digest, event.source)
        else if (event.type === 'unavailable' && this.alive) this.result.unavailableChunks++
      }
    })
    const locator: ChunkLocator = {
      locate: digest => this.locate(digest),
      locateSoon: async (digest, signal) => await this.locateSoon(digest, signal),
      packChunks: pack => (w.packChunks.get(pack) ?? []).filter(c => this.vouches(c))
    }
    this.chunks = new NodeChunks({
      locator,
      store: resolverStore(this.resolver, this.cache),
      isAsking: (digest, from) => this.source?.isAsking(digest, from) === true,
      clock: w.clock
    })
  }

  /** This node as the peer source sees it: PeerChunkSource only calls toString() on a PeerId and hands it back. */
  get peerId (): PeerId { return this as unknown as PeerId }
  toString (): string { return this.id }

  private get sim (): Simulator { return this.w.sim }
  private get latency (): number { return this.w.s.links.latencyMs }

  /** MS of work on this node's CPU (the machine's, with shared cores). */
  cpuWork (ms: number): Promise<void> { return this.cpu.work(ms) }

  // --- the workload -------------------------------------------------------------

  async runWorkload (chunks: Chunk[], plan: MountPlan): Promise<void> {
    const r = this.result
    const started = this.sim.now
    r.startedMs = started
    try {
      await this.mount(plan)
      r.mountMs = this.sim.now - started
      let next = 0
      let failed = false
      const think = this.w.p.workloadCpuMs / Math.max(1, chunks.length)
      const reader = async (): Promise<void> => {
        while (next < chunks.length && !failed && this.alive) {
          const chunk = chunks[next++]!
          // A failed FUSE read is retried once by the kernel before the application sees EIO.
          if (!await this.resolve(chunk) && !await this.resolve(chunk)) failed = true
          else await this.think(think)
        }
      }
      await Promise.all(Array.from({ length: this.w.p.readWindow }, reader))
      if (failed) throw new Error('a read failed with EIO')
      if (!this.alive) return
      r.completionMs = this.sim.now - started
      r.outcome = 'ok'
    } catch (err) {
      if (!this.alive) return
      r.completionMs = this.sim.now - started
      r.outcome = 'failed'
      r.error = (err as Error).message
    }
  }

  /**
   * As Agent.mount (loadImage, openImageView): tag lookups from the origin; the
   * metadata blobs (manifest, signature manifest and envelope, config) one after
   * another and then every catalog at once, each through the resolver (peers,
   * then origin); every pack announced; the catalogs opened for serving; then
   * the mount's own work (FUSE mount, SQLite opens).
   */
  private async mount (plan: MountPlan): Promise<void> {
    const signal = this.sim.timeout(MOUNT_FETCH_DEFAULTS.mountTimeoutMs)
    for (let i = 0; i < plan.tags; i++) {
      try {
        await this.originGet(plan.tagBytes, 'metadata', signal)
      } catch (err) {
        if (signal.aborted) throw err
        throw new Error('mount failed: a tag lookup at the origin failed')
      }
    }
    for (const blob of plan.metadata) {
      if (!await this.fetchBlob(blob, plan.manifest)) throw new Error('mount failed: image metadata was unavailable')
    }
    // Catalogs in the metadata's swarm (openImageView), not their layer's.
    const catalogs = await Promise.all(plan.layers.map(async l => await this.fetchBlob(l.blob, plan.manifest)))
    if (catalogs.includes(false)) throw new Error('mount failed: a catalog was unavailable')
    // A layer's packs are in the swarm of its catalog's digest.
    for (const layer of plan.layers) this.join(layer.catalog, layer.packs)
    this.servingImage = true
    this.locatorChanged()
    await this.cpu.work(this.w.p.mountMs)
  }

  /** The agent's fetchBlob: name the blob as servable (a child asking for it makes us fetch it for both), join its group's swarm, resolve it. */
  private async fetchBlob (blob: Chunk, group: Digest): Promise<boolean> {
    this.wholeBlobs.add(blob.digest)
    this.locatorChanged()
    this.join(group, [blob.digest])
    return await this.resolve(blob)
  }

  /** Peering.join: PACKS are in KEY's swarm; announce KEY. */
  private join (key: Digest, packs: readonly Digest[]): void {
    for (const pack of packs) if (!this.swarmKeys.has(pack)) this.swarmKeys.set(pack, key)
    this.announce(key)
  }

  /** Peering.swarmOf: the DHT key of a pack's swarm. */
  private swarmOf (pack: Digest): Digest {
    return this.swarmKeys.get(pack) ?? pack
  }

  /** Peering.announce: the key's members kept for good, the DHT provide (fire and forget), and a JOIN to every peer we are connected to. */
  announce (key: Digest): void {
    if (!this.w.peers || this.announced.has(key)) return
    this.announced.add(key)
    this.members.own(key)
    void this.router.announce(key, { signal: NEVER })
    for (const peer of this.connections) this.w.join(this, peer, [key])
  }

  /**
   * ChunkServer.join (peer exchange): PEER joined these swarms. It hears what
   * SwarmMembers.exchange answers (MEMBERS: the most recently heard and the
   * core), and those it names that have a JOIN stream open to us hear of it.
   * Bad peers (bad-peer.ts) ignore JOINs.
   */
  joined (peer: Node, keys: readonly Digest[]): void {
    if (!this.alive || this.bad) return
    this.joinedUs.add(peer)
    for (const key of keys) {
      const { answer, passOn } = this.members.exchange(key, peer.peerId, [])
      this.w.members(this, peer, key, answer.map(m => m.id))
      for (const id of passOn) {
        const other = this.w.node(id)
        if (other !== undefined && this.joinedUs.has(other)) this.w.members(this, other, key, [peer.id])
      }
    }
  }

  /** Peering's onMembers: a peer told us of these members of KEY's swarm. */
  heard (key: Digest, ids: readonly string[]): void {
    if (!this.alive) return
    for (const id of ids) {
      const member = this.w.node(id)
      if (member !== undefined && member !== this) this.addMember(key, member)
    }
  }

  private addMember (key: Digest, member: Node): void {
    this.members.add(key, member.peerId, [])
  }

  /** Peering.onConnect: the swarms a new connection hears our JOIN for (bad peers JOIN all theirs). */
  joinOnConnect (): Digest[] {
    return [...this.announced].filter(key => this.bad || this.members.wantsMore(key))
  }

  /** SwarmMembers.of: the members of KEY's swarm we heard of from peers (the living and the dead). */
  membersOf (key: Digest): readonly Node[] {
    return this.members.of(key) as unknown as readonly Node[]
  }

  /** The connection to PEER closed: its JOIN stream with it (members heard of stay listed, as in src). */
  forget (peer: Node): void {
    this.connections.delete(peer)
    this.joinedUs.delete(peer)
  }

  /** Whether the connection gater lets PEER through (not banned). */
  admits (peer: Node): boolean {
    return !this.bans.isBanned(peer.id)
  }

  /** The application's own work between reads: one thread, so one think at a time. */
  private async think (ms: number): Promise<void> {
    const previous = this.thinking
    const mine = previous.then(async () => await this.cpu.work(ms))
    this.thinking = mine
    await mine
  }

  kill (): void {
    this.alive = false
    this.result.outcome = 'killed'
    const gone = new PeerGone(`node ${this.index} died`)
    for (const t of [...this.up.transfers, ...this.down.transfers]) t.abort(gone)
    // Its connections reset: every request to it or from it fails at once.
    for (const call of [...this.inbound, ...this.outbound]) call.fail(new PeerUnavailableError(this.id, 'connection reset'))
    for (const peer of this.connections) peer.forget(this)
    this.connections.clear()
    this.joinedUs.clear()
  }

  /** The results that live in the peer source. */
  finish (): void {
    this.w.diagnostics.server.fetchLimit += this.chunks.stats.fetchLimited
    const stats = this.source?.stats
    if (stats === undefined) return
    this.result.receivedFrom = Object.fromEntries(stats.perPeerBytes)
    this.result.verificationFailures = stats.verificationFailures
    this.result.bannedPeers = stats.badPeers
    const sum = this.w.diagnostics.source
    for (const key of Object.keys(sum) as Array<keyof typeof sum>) sum[key] += stats[key]
  }

  // --- the resolver's sources, and its results -----------------------------------

  /** True once the chunk is held (verified); false when the resolver gave up on it (ChunkUnavailableError). */
  private async resolve (chunk: Chunk): Promise<boolean> {
    try {
      // A signal of its own, never aborted: the resolver adds an abort listener per read, and
      // one signal shared by every read of 10,000 nodes made each add scan hundreds of
      // thousands of them (Node's EventTarget looks for a duplicate first).
      await this.resolver.get(chunk, { signal: new AbortController().signal })
      return true
    } catch (err) {
      if (err instanceof ChunkUnavailableError) return false
      throw err
    }
  }

  /** The resolver's peer source: Peering announces the pack, then the real PeerChunkSource. */
  private async fromPeers (chunk: Chunk, signal: AbortSignal): Promise<Uint8Array | undefined> {
    const source = this.source!
    this.announce(this.swarmOf(chunk.pack))
    const parentRequests = source.stats.parentRequests
    const started = this.sim.now
    const bytes = await source.get(chunk, { signal })
    if (!chunk.blob) (bytes !== undefined ? this.w.peerGetHits : this.w.peerGetMisses).push(this.sim.now - started)
    if (bytes === undefined) {
      // Approximate when other gets run on this node at the same time (fetches for children).
      this.peerMisses.set(chunk.digest, source.stats.parentRequests === parentRequests ? 'noParentAsked' : 'parentsFailed')
      return undefined
    }
    this.peerMisses.delete(chunk.digest)
    this.cache.landing.set(chunk.digest, this.arriving.get(chunk.digest) ?? 1)
    this.arriving.delete(chunk.digest)
    // Verifying costs CPU before the bytes count as held.
    await this.cpu.work(this.w.p.cpuMsPerMB * chunk.length / 1e6)
    return bytes
  }

  /** The resolver's origin source (OriginChunkSource over HttpOrigin): the stored bytes, with HttpOrigin's retries. */
  private async fromOrigin (chunk: Chunk, signal: AbortSignal): Promise<Uint8Array> {
    await this.originGet(chunk.storedLength, chunk.blob ? 'metadata' : 'pack', signal)
    const lastPeerTry = this.peerMisses.get(chunk.digest)
    if (lastPeerTry !== undefined) {
      this.w.diagnostics[chunk.blob ? 'originBlobs' : 'originChunks'][lastPeerTry]++
      this.peerMisses.delete(chunk.digest)
    }
    this.cache.landing.set(chunk.digest, 0)
    // Decompressing and verifying cost CPU before the bytes count as held.
    await this.cpu.work(this.w.p.cpuMsPerMB * chunk.length / 1e6)
    return bytesOf(chunk, true)
  }

  /** The resolver's event for each resolution: the report's bytes by source and depth histogram (image chunks only). */
  private resolved (digest: Digest, source: string): void {
    if (source !== 'peers' && source !== 'origin') return
    const chunk = this.w.chunks.get(digest)!
    if (chunk.blob) return // the agent's source stats count chunk reads, and so does the report
    if (source === 'peers') {
      const h = this.w.diagnostics.depth.histogram
      const depth = this.cache.depth(digest)
      h[depth] = (h[depth] ?? 0) + 1
    }
    const s = (this.result.sources[source] ??= { chunks: 0, bytes: 0 })
    s.chunks++
    s.bytes += chunk.length
  }

  // --- HttpOrigin's attempts (its retries are the real RetryingRequests') ---------

  /** BYTES from the origin under HttpOrigin's retries; rejects when they gave up or SIGNAL aborts. */
  private async originGet (bytes: number, kind: 'pack' | 'metadata', signal: AbortSignal): Promise<void> {
    await this.http.retrying(signal, async () => await this.originAttempt(bytes, kind, signal))
  }

  /**
   * One attempt (RetryingRequests.once, whose no-progress timer this replaces: the
   * model moves bytes in pieces, not segments, see Watchdog): it holds one of the
   * requests in flight, and fails after requestTimeoutMs without progress.
   */
  private async originAttempt (bytes: number, kind: 'pack' | 'metadata', signal: AbortSignal): Promise<void> {
    if (!this.alive) throw new PeerGone(`node ${this.index} is dead`) // not retried
    const release = await this.http.acquire(signal)
    const stall = new Watchdog(this.sim, this.http.requestTimeoutMs)
    const attempt = AbortSignal.any([signal, stall.signal])
    try {
      this.w.originStats.requests++
      await this.request(this.w.s.origin.latencyMs + 2 * this.latency, attempt)
      if (!this.w.originAlive) throw new PeerGone('connection refused')
      stall.started()
      if (bytes > 0) await this.receive(new Transfer(this.sim, this.w.origin, this.down, bytes, { ...this.transferOptions(), onProgress: stall.progress }), attempt, true)
      if (kind === 'pack') this.w.originStats.packBytes += bytes
      else {
        this.w.originStats.metadataBytes += bytes
        this.w.originStats.metadataRequests++
      }
    } catch (err) {
      const o = this.w.diagnostics.originFailures
      if (signal.aborted) o.cancelled++
      else if (stall.signal.aborted) o.stalled++
      else o.refused++
      if (signal.aborted) throw signal.reason
      if (stall.signal.aborted) throw new OriginError(`origin: no answer, or no more bytes, for ${this.http.requestTimeoutMs} ms`, { retryable: true })
      if (err instanceof PeerGone) throw new OriginError(`origin: ${err.message}`, { retryable: true })
      throw err
    } finally {
      stall.stop()
      release()
    }
  }

  /** A request on its way: LATENCYMS on the wire, then requestOverheadMs of CPU to handle it (which contends, with shared cores). */
  private async request (latencyMs: number, signal: AbortSignal): Promise<void> {
    if (latencyMs > 0) await this.sim.sleep(latencyMs, signal)
    await abortable(this.cpu.work(this.w.p.requestOverheadMs), signal)
  }

  private transferOptions (): { latencyMs: number, pieceBytes: number } {
    return { latencyMs: this.latency, pieceBytes: this.w.p.pieceBytes }
  }

  /**
   * Waits for transfer T. If SIGNAL aborts first: an origin response stops (the
   * connection closes); a peer's chunk that started is already in the socket and
   * arrives anyway, only nobody waits for it.
   */
  private async receive (t: Transfer, signal: AbortSignal, stopOnAbort: boolean): Promise<void> {
    if (!this.alive) t.abort(new PeerGone(`node ${this.index} is dead`)) // its leftover async work must not load the links
    const onAbort = (): void => { if (stopOnAbort || !t.started) t.abort(new PeerGone('cancelled')) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      await abortable(t.done, signal)
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  // --- the chunk protocol's transport (ChunkClient's job) ------------------------

  /**
   * WORK on TARGET on this node's behalf, as one request of the chunk protocol:
   * rejects when SIGNAL aborts (the client forgets the request; WORK sees SIGNAL,
   * as the server sees the CANCEL), when either node dies, or on disconnect.
   */
  call<T> (target: Node, work: (signal: AbortSignal) => Promise<T>, signal: AbortSignal): Promise<T> {
    if (signal.aborted) return Promise.reject(signal.reason)
    return new Promise<T>((resolve, reject) => {
      let done = false
      const settle = (fn: () => void): void => {
        if (done) return
        done = true
        signal.removeEventListener('abort', onAbort)
        this.outbound.delete(call)
        target.inbound.delete(call)
        fn()
      }
      const call: Call = { target, fail: err => settle(() => reject(err)) }
      const onAbort = (): void => settle(() => reject(signal.reason))
      if (!this.alive) {
        reject(new PeerUnavailableError(target.id, 'this node is dead'))
        return
      }
      // A request needs a connection: a new one exchanges JOINs (Peering.onConnect, on both sides).
      if (target.alive) this.w.connect(this, target)
      signal.addEventListener('abort', onAbort, { once: true })
      this.outbound.add(call)
      target.inbound.add(call)
      work(signal).then(value => settle(() => resolve(value)), (err: Error) => settle(() => reject(err)))
    })
  }

  /** ChunkClient.disconnect: the session to PEER fails, and every request on it; the connection closes. */
  hangUp (peer: Node): void {
    for (const call of [...this.outbound]) if (call.target === peer) call.fail(new PeerUnavailableError(peer.id, 'disconnected by us'))
    if (this.connections.has(peer)) {
      this.forget(peer)
      peer.forget(this)
    }
  }

  // --- ChunkServer and NodeChunks (restated; numbers from SERVING_DEFAULTS) ------

  /** A request reaches this node: the link latency, then its CPU; refused if this node is dead. */
  private async arrive (signal: AbortSignal): Promise<void> {
    await this.request(this.latency, signal)
    if (!this.alive) throw new PeerUnavailableError(this.id, 'connection refused')
  }

  /** An answer without data goes back over the link. */
  private async reply<S extends 'dont-have' | 'busy' | 'pending'> (status: S, signal: AbortSignal): Promise<{ status: S }> {
    if (this.latency > 0) await this.sim.sleep(this.latency, signal)
    return { status }
  }

  /** Answers FROM's want (ChunkServer.answer with NodeChunks.get). */
  async serve (from: Node, chunk: Chunk, ask: WantOptions, signal: AbortSignal): Promise<ChunkReply> {
    const d = this.w.diagnostics.server
    d.wants++
    await this.arrive(signal)
    if (this.bad) {
      // simulations/lib/bad-peer.ts: every image chunk, with a bit flipped; no limits.
      if (chunk.blob) return await this.reply('dont-have', signal)
      await this.send(from, chunk, signal)
      return { status: 'data', bytes: bytesOf(chunk, false) }
    }
    const load = { peerActive: this.active.get(from) ?? 0, peerHolder: this.holderActive.get(from) ?? 0, holderPeers: this.holderActive.size, active: this.activeAll }
    const admission = admitWant(SERVER, load, ask.fetch)
    if (admission !== 'admitted') {
      d[admission === 'busy-peer' ? 'busyPerPeer' : admission === 'busy-holders' ? 'busyHolderPeers' : 'busyAllPeers']++
      return await this.reply('busy', signal)
    }
    increment(this.active, from, 1)
    this.activeAll++
    if (!ask.fetch) increment(this.holderActive, from, 1)
    try {
      let found: boolean | 'pending'
      if (ask.fetch) {
        d.parentRequests++
        found = await abortable(this.forChild(from, chunk, Math.min(ask.waitMs, SERVER.maxWaitMs), signal), signal)
      } else {
        found = await this.chunks.get(chunk.digest, { signal, fetch: false, from: from.id }) !== undefined
      }
      if (found === 'pending') {
        d.pending++
        return await this.reply('pending', signal)
      }
      if (!found) {
        d.dontHave++
        if (!this.vouches(chunk)) {
          d.dontHaveNotVouched++
          if (!chunk.blob) d.dontHaveNotMounted++
        }
        else if (ask.fetch) d.dontHaveFetchFailed++
        return await this.reply('dont-have', signal)
      }
      await this.send(from, chunk, signal)
      d.served++
      return { status: 'data', bytes: bytesOf(chunk, true) }
    } finally {
      increment(this.active, from, -1)
      this.activeAll--
      if (!ask.fetch) increment(this.holderActive, from, -1)
    }
  }

  /**
   * A parent request (ChunkServer.lookup): NodeChunks.get with the fetch flag, or
   * `pending` after WAITMS while it runs on. As in ChunkServer, the requester's
   * CANCEL reaches the fetch only until the answer: after `pending` it runs on.
   */
  private async forChild (from: Node, chunk: Chunk, waitMs: number, signal: AbortSignal): Promise<boolean | 'pending'> {
    const request = new AbortController()
    const cancel = (): void => request.abort(signal.reason)
    signal.addEventListener('abort', cancel, { once: true })
    try {
      const fetching = this.chunks.get(chunk.digest, { signal: request.signal, fetch: true, from: from.id }).then(bytes => bytes !== undefined)
      const expired = this.sim.sleep(waitMs).then(() => 'pending' as const)
      return await Promise.race([fetching, expired])
    } finally {
      signal.removeEventListener('abort', cancel)
    }
  }

  /** ChunkIndex.locate: a whole blob once this node's own fetch of it started, an image chunk once its catalogs are open. */
  private locate (digest: Digest): Chunk | undefined {
    const chunk = this.w.chunks.get(digest)
    return chunk !== undefined && this.vouches(chunk) ? chunk : undefined
  }

  private vouches (chunk: Chunk): boolean {
    return chunk.blob ? this.wholeBlobs.has(chunk.digest) : this.servingImage
  }

  /** ChunkIndex.locateSoon: the chunk once this node vouches for it, or undefined when SIGNAL aborts first. */
  private async locateSoon (digest: Digest, signal: AbortSignal): Promise<Chunk | undefined> {
    // One abort listener for the whole wait (not one per wake-up): it ends the current one.
    let wake = (): void => {}
    const onAbort = (): void => wake()
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      for (;;) {
        const found = this.locate(digest)
        if (found !== undefined || signal.aborted) return found
        const learnt = deferred<void>(this.sim)
        wake = learnt.resolve
        this.locatorWaiters.add(learnt.resolve)
        await learnt.promise
        this.locatorWaiters.delete(learnt.resolve)
      }
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  /** The chunk index learnt more digests (ChunkIndex wakes its locateSoon waiters). */
  private locatorChanged (): void {
    for (const wake of [...this.locatorWaiters]) wake()
  }

  /**
   * Sends CHUNK to FROM: as stored (one zstd frame) when the image stored it
   * compressed, else raw (whole blobs, and what a bad peer sends). Sending
   * (compressing, encrypting) costs this node CPU too, which slows its own reads.
   */
  private async send (from: Node, chunk: Chunk, signal: AbortSignal): Promise<void> {
    if (!this.alive) throw new PeerUnavailableError(this.id, 'connection reset')
    const wire = this.bad ? chunk.length : wireBytes(chunk)
    void this.cpu.work(this.w.p.cpuMsPerMB * chunk.length / 1e6)
    await from.receive(new Transfer(this.sim, this.up, from.down, wire, this.transferOptions()), signal, false)
    this.result.uploadBytes += wire
    if (!this.bad) from.arriving.set(chunk.digest, this.cache.depth(chunk.digest) + 1)
  }

  /** Answers FROM's HAVE: the byte ranges of PACK this node holds (NodeChunks.held); a bad peer claims every pack of the image whole. */
  async answerHave (pack: Digest, signal: AbortSignal): Promise<ByteRange[]> {
    this.w.diagnostics.server.haves++
    await this.arrive(signal)
    const chunks = this.w.packChunks.get(pack) ?? []
    const ranges: ByteRange[] = []
    if (this.bad) {
      if (chunks.some(c => !c.blob)) ranges.push({ offset: 0, length: Math.max(...chunks.map(c => c.packOffset + c.storedLength)) })
    } else {
      ranges.push(...await this.chunks.held(pack))
    }
    if (this.latency > 0) await this.sim.sleep(this.latency, signal)
    return normalizeRanges(ranges) // as ChunkClient does with every HAVE
  }
}

/** The requesting side of the chunk protocol for the real PeerChunkSource, over the model's links. */
class SimClient implements ChunkRequester {
  private readonly node: Node

  constructor (node: Node) {
    this.node = node
  }

  async want (peer: PeerId, chunk: { digest: Digest, length: number }, options: WantOptions): Promise<ChunkReply> {
    const target = peer as unknown as Node
    return await this.node.call(target, signal => target.serve(this.node, chunk as Chunk, options, signal), options.signal)
  }

  async have (peer: PeerId, pack: Digest, options: { signal: AbortSignal }): Promise<ByteRange[]> {
    const target = peer as unknown as Node
    return await this.node.call(target, signal => target.answerHave(pack, signal), options.signal)
  }

  async disconnect (peer: PeerId): Promise<void> {
    this.node.hangUp(peer as unknown as Node)
  }
}

/** DhtPackRouter over the model's cost model of kad-dht (see the header). */
class SimRouter implements PackRouter {
  private readonly w: World
  private readonly node: Node
  private readonly announced = new Map<string, Promise<void>>()
  private readonly lookups = new Map<string, Lookup>()
  private readonly answers = new Map<string, { heard: readonly Node[], walked: Swarm, answer: SwarmAnswer }>()

  constructor (w: World, node: Node) {
    this.w = w
    this.node = node
  }

  async announce (pack: Digest, options: { signal: AbortSignal }): Promise<void> {
    let provide = this.announced.get(pack)
    if (provide === undefined) {
      // Peering delays a key's first provide by 60-90 s (peer exchange finds a burst's swarm first).
      const delay = PROVIDE_DELAY_MS.min + this.w.random() * (PROVIDE_DELAY_MS.max - PROVIDE_DELAY_MS.min)
      provide = this.w.sim.sleep(delay)
        .then(async () => await this.node.cpuWork(this.w.p.announceMs + this.w.dhtRpcCost))
        .then(() => { if (this.node.alive) this.w.provide(pack, this.node) })
      this.announced.set(pack, provide)
    }
    await abortable(provide, options.signal)
  }

  answer (key: Digest): SwarmAnswer {
    return this.current(key).answer
  }

  /** As DhtPackRouter.settled, except that members heard during the wait do not end it (the model's walk does). */
  async settled (key: Digest, options: { signal: AbortSignal }): Promise<void> {
    const { lookup, answer } = this.current(key)
    if (!answer.settled) await abortable(lookup.finished, options.signal)
  }

  /**
   * As DhtPackRouter.current: the key's walk and the answer: the members peers
   * told us of, then the last finished walk's finds without them and without
   * self (stale-while-revalidate); during the first walk, the members only (the
   * model's walk finds nothing before it ends). The same array until an input changes.
   */
  private current (key: Digest): { lookup: Lookup, answer: SwarmAnswer } {
    const heard = this.node.membersOf(key)
    const lookup = this.lookup(key, heard.length > 0)
    const settled = lookup.done || lookup.previous !== undefined || heard.length > 0
    const walked = lookup.done ? lookup.found : lookup.previous ?? NOBODY
    if (!lookup.done && lookup.previous !== undefined) this.w.diagnostics.dht.staleAnswers++
    let memo = this.answers.get(key)
    if (memo?.heard !== heard || memo.walked !== walked || memo.answer.settled !== settled) {
      const skip = new Set<Node>(heard)
      const peers: PeerId[] = heard.map(n => n.peerId)
      for (let i = 0; i < walked.count; i++) {
        const n = walked.nodes[i]!
        if (n !== this.node && !skip.has(n)) peers.push(n.peerId)
      }
      memo = { heard, walked, answer: { peers, settled } }
      this.answers.set(key, memo)
    }
    return { lookup, answer: memo.answer }
  }

  /**
   * The key's current walk, or a new one when the last is stale (an empty one after 1 s,
   * unless members told us of themselves). As DhtPackRouter.lookup: no first walk when
   * members told us of themselves, and a first walk ends (before its next RPC) once they do.
   */
  private lookup (pack: Digest, haveMembers: boolean): Lookup {
    const cached = this.lookups.get(pack)
    if (cached !== undefined && (cached.others > 0 || haveMembers ? cached.expires : cached.emptyExpires) > this.w.sim.now) return cached
    const walk = deferred<void>(this.w.sim)
    const lookup: Lookup = { key: pack, done: false, found: NOBODY, others: 0, previous: cached?.found, expires: Infinity, emptyExpires: Infinity, finished: walk.promise }
    this.lookups.set(pack, lookup)
    const finish = (found: Swarm): void => {
      lookup.found = found
      lookup.others = found.count - (this.w.lists(pack, found, this.node) ? 1 : 0)
      lookup.done = true
      lookup.expires = this.w.sim.now + this.w.p.lookupCacheMs
      // An empty answer is retried sooner: in a burst the others' records may be a moment away.
      lookup.emptyExpires = this.w.sim.now + Math.min(this.w.p.lookupCacheMs, EMPTY_ANSWER_TTL_MS)
      walk.resolve()
    }
    if (cached === undefined && haveMembers) {
      this.w.diagnostics.dht.walksSkipped++
      finish(NOBODY)
      lookup.emptyExpires = lookup.expires
      return lookup
    }
    this.w.diagnostics.dht.walks++
    void this.runWalk(pack, lookup.previous === undefined).then(finish)
    return lookup
  }

  /** A walk's CPU (lookupMs, then dhtRpcMs per DHT peer asked) and its finds; a first walk stops before an RPC once members told us of themselves. */
  private async runWalk (pack: Digest, first: boolean): Promise<Swarm> {
    await this.node.cpuWork(this.w.p.lookupMs)
    for (let asked = 0; asked < this.w.dhtPeers; asked++) {
      if (first && this.node.membersOf(pack).length > 0) {
        this.w.diagnostics.dht.walksStopped++
        return NOBODY
      }
      await this.node.cpuWork(this.w.p.dhtRpcMs)
    }
    return this.w.providersOf(pack)
  }
}

interface Lookup {
  key: Digest
  done: boolean
  /** The walk's answer, and how many of it are not self. */
  found: Swarm
  others: number
  previous: Swarm | undefined
  expires: number
  emptyExpires: number
  finished: Promise<void>
}

/** DhtPackRouter: how long a walk that found nobody is reused (unless members told us of themselves), and when a key's first provide goes out. */
const { emptyAnswerTtlMs: EMPTY_ANSWER_TTL_MS, provideDelayMs: PROVIDE_DELAY_MS } = PACK_ROUTER_DEFAULTS
const NOBODY: Swarm = { nodes: [], count: 0 }

/** A TCP segment: what a real response makes progress by. */
const SEGMENT_BYTES = 1460

/**
 * HttpOrigin's no-progress timeout in simulated time: `signal` aborts when the
 * response has not started `ms` after the request, or when its bytes come
 * slower than one segment per `ms`. The model moves pieces of pieceBytes, so a
 * piece that took a while stands for a trickle of segments over that time (a
 * fair share of a busy origin); it is checked as each piece arrives.
 */
class Watchdog {
  readonly signal: AbortSignal
  private readonly controller = new AbortController()
  private readonly sim: Simulator
  private readonly ms: number
  private last: number | undefined
  private stopped = false

  constructor (sim: Simulator, ms: number) {
    this.sim = sim
    this.ms = ms
    this.signal = this.controller.signal
    sim.at(sim.now + ms, () => { if (this.last === undefined) this.stall() })
  }

  /** The response started (headers). */
  started (): void {
    this.last ??= this.sim.now
  }

  /** BYTES of body arrived (called from a quiet piece event): as that many segments, evenly spread since the last piece. */
  readonly progress = (bytes: number): void => {
    const last = this.last ?? this.sim.now
    this.last = this.sim.now
    if (this.sim.now - last > this.ms * Math.ceil(bytes / SEGMENT_BYTES)) this.stall()
  }

  stop (): void { this.stopped = true }

  private stall (): void {
    if (this.stopped || this.signal.aborted) return
    this.sim.wake()
    this.controller.abort(new TimeoutError(this.ms))
  }
}

/**
 * What a chunk costs on the wire between peers: its stored bytes when the image
 * stored it compressed (the catalog's codec is zstd; the converter keeps a chunk
 * raw unless compression saves enough, so stored < length says zstd), else its
 * bytes. Whole blobs travel raw.
 */
function wireBytes (chunk: Chunk): number {
  return !chunk.blob && chunk.storedLength < chunk.length ? chunk.storedLength : chunk.length
}

/**
 * A node's disk cache, as the resolver uses it (ChunkCache): which chunks it holds
 * (all verified: the model has no restarts), and how many peer hops each came from.
 */
class NodeCache implements ChunkCache {
  readonly name = 'disk'
  /** Digest → hops from the origin (0: this node fetched it from the origin). */
  private readonly held = new Map<Digest, number>()
  /** Depth of a chunk a source has just returned, until the resolver stores it. */
  readonly landing = new Map<Digest, number>()

  has (digest: Digest): boolean { return this.held.has(digest) }
  isVerified (digest: Digest): boolean { return this.held.has(digest) }
  markVerified (): void {}
  depth (digest: Digest): number { return this.held.get(digest) ?? 0 }
  // The model's workload resolves whole chunks (`get`), never reads into a buffer.
  tryReadSync (): boolean { return false }
  async readInto (): Promise<boolean> { return false }

  async get (chunk: ChunkRef): Promise<Uint8Array | undefined> {
    return this.held.has(chunk.digest) ? bytesOf(chunk, true) : undefined
  }

  async put (digest: Digest): Promise<void> {
    this.held.set(digest, this.landing.get(digest) ?? 0)
    this.landing.delete(digest)
  }

  async remove (digest: Digest): Promise<void> {
    this.held.delete(digest)
  }
}

/** A signal that never aborts. */
const NEVER = new AbortController().signal

/** Adds BY to a per-peer count, dropping the entry at zero (as ChunkServer does). */
function increment (counts: Map<Node, number>, peer: Node, by: number): void {
  const n = (counts.get(peer) ?? 0) + by
  if (n <= 0) counts.delete(peer)
  else counts.set(peer, n)
}

/** PROMISE, or a rejection with SIGNAL's reason as soon as it aborts. */
function abortable<T> (promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason)
  if (signal === NEVER) return promise
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
  })
}

function percentile (sorted: number[], q: number): number {
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!
}

/**
 * The mount's fetches from the profile. A recorded profile has the metadata's
 * total bytes and requests (besides the catalogs): four blobs (the manifest, the
 * signature manifest and envelope, the config), which go through the resolver,
 * and the reads of index.json the lone agent made for its two tag lookups (the
 * image's and its signature's; one since HttpOrigin reuses a read for 2 s), which
 * always go to the origin. Against a registry the two lookups are HEADs: no
 * body. The bytes are split evenly (the profile does not itemise them), and the
 * blobs get digests of their own for the rendezvous.
 */
function mountPlan (w: World, profile: WorkloadProfile): MountPlan {
  const { bytes, requests } = profile.metadata
  const blobs = Math.min(4, requests)
  const each = requests > 0 ? bytes / requests : 0
  const registry = w.s.origin.kind === 'registry'
  const tags = registry ? 2 : requests - blobs
  const tagBytes = registry ? 0 : each
  const metadata = Array.from({ length: Math.max(1, blobs) }, (_, i) =>
    w.blob(`sha256:${createHash('sha256').update(`${profile.key} metadata ${i}`).digest('hex')}`, Math.max(1, Math.round(each))))
  // Which layer a pack is in: the profile does not say; in pack order, in equal shares. (In a
  // burst every node joins every layer's key, so this changes which walk finds a swarm, not who is in it.)
  const packs = profile.packs as Digest[]
  const perLayer = Math.ceil(packs.length / Math.max(1, profile.catalogs.length))
  return {
    tags,
    tagBytes,
    manifest: metadata[0]!.digest,
    metadata,
    layers: profile.catalogs.map((c, i) => ({ catalog: c.digest, blob: w.blob(c.digest, c.size), packs: packs.slice(i * perLayer, (i + 1) * perLayer) }))
  }
}

/** Connections to the DHT's closest peers a node makes once bootstrapped (kad-dht's self-walk: k = 20). */
const DHT_NEIGHBOURS = 20

/**
 * The connections agents have before the burst: everyone bootstraps from nodes
 * 0 and 1 (as cluster.ts starts them), and kad-dht's self-walk connects each
 * node to about k others (here random ones: DHT closeness is unrelated to
 * anything else in the model). Requests add connections as they go.
 * libp2p's connection limit (300) is not modelled: the seeds keep all theirs.
 */
function connectCluster (w: World, nodes: Node[]): void {
  const random = seededRandom(w.s.seed + 3)
  const k = Math.min(DHT_NEIGHBOURS, nodes.length - 1)
  for (const node of nodes) {
    for (const seed of nodes.slice(0, 2)) w.connect(node, seed)
    for (let i = 0; i < k; i++) w.connect(node, nodes[Math.floor(random() * nodes.length)]!)
  }
}

export interface ModelRun {
  result: ClusterResult
  events: number
  /** Wall-clock seconds the simulation took. */
  seconds: number
  /** JavaScript heap in use at the end, MB (before the run's garbage is collected). */
  heapMB: number
  /** How the peer policy behaved (peers runs only). */
  diagnostics?: PolicyDiagnostics
}

/** The policy's settings the model ran with (the real ones: nothing here restates them). */
export const POLICY_SETTINGS = {
  peerSource: PEER_SOURCE_DEFAULTS,
  rendezvous: { largeSwarm: LARGE_SWARM, coreShare: CORE_SHARE },
  server: SERVER,
  peering: { locateWaitMs: SERVING_DEFAULTS.locateWaitMs, provideDelayMs: PROVIDE_DELAY_MS, ...PEER_EXCHANGE, membersPerMessage: MAX_MEMBERS, emptyAnswerTtlMs: EMPTY_ANSWER_TTL_MS },
  resolver: RESOLVER_DEFAULTS,
  http: RETRY_DEFAULTS
}

/** Runs one scenario in the model (peers, baseline, or a lone node) and reports it as a real run would be. */
export async function simulate (options: ModelOptions): Promise<ModelRun> {
  const started = performance.now()
  const w = new World(options)
  const { s, sim } = w
  const count = options.mode === 'lone' ? 1 : s.nodes
  const arrivals = options.mode === 'lone' ? [0] : arrivalTimes(s)
  const chunks = options.profile.chunks.map(c => w.chunk(c))
  const plan = mountPlan(w, options.profile)
  const nodes = Array.from({ length: count }, (_, i) => new Node(w, i, false))
  const bad = w.peers && s.faults.badPeers !== undefined
    ? Array.from({ length: countOf(s.faults.badPeers.share, s.nodes) }, (_, i) => new Node(w, count + i, true))
    : []
  // Bad peers join before the burst, as simulations/lib/bad-peer.ts does: they announce the image's
  // packs, its layers' keys and its manifest's (their records have landed when it starts), and JOIN
  // every peer they are connected to with the last 32 of those keys.
  const badKeys = [...options.profile.packs as Digest[], ...plan.layers.map(l => l.catalog), plan.manifest]
  for (const b of bad) {
    for (const key of badKeys) w.provide(key, b)
    for (const key of badKeys.slice(-MAX_JOIN_KEYS)) b.announced.add(key)
  }
  if (w.peers) connectCluster(w, [...nodes, ...bad])

  const events: ClusterResult['events'] = []
  if (options.mode !== 'lone' && s.faults.kill !== undefined) {
    const doomed = killedNodes(s).map(i => nodes[i]!)
    sim.at(s.faults.kill.atMs, () => {
      events.push({ tMs: sim.now, what: `kill -9 of ${doomed.length} agents` })
      for (const n of doomed) n.kill()
    })
  }
  if (options.mode !== 'lone' && s.faults.originOutage !== undefined) {
    const { fromMs, toMs } = s.faults.originOutage
    sim.at(fromMs, () => {
      events.push({ tMs: sim.now, what: 'origin stopped' })
      w.originAlive = false
      for (const t of [...w.origin.transfers]) t.abort(new PeerGone('origin stopped'))
    })
    sim.at(toMs, () => {
      events.push({ tMs: sim.now, what: 'origin restarted' })
      w.originAlive = true
    })
  }

  const samples: OriginSample[] = []
  const sample = (): void => {
    samples.push({ tMs: sim.now, bytesSent: w.origin.bytes, requests: w.originStats.requests })
    sim.at(sim.now + SAMPLE_MS, sample)
  }
  sample()
  // libp2p's own upkeep (DHT table refresh, identify, pings, the peer store) costs each node CPU all the time.
  const upkeep = w.p.upkeepMsPerPeer * Math.min(20, s.nodes - 1)
  if (w.peers && upkeep > 0) {
    const tick = (n: Node): void => {
      if (!n.alive) return
      void n.cpuWork(upkeep)
      sim.at(sim.now + 1000, () => tick(n))
    }
    for (const n of [...nodes, ...bad]) tick(n)
  }

  let running = count
  for (const [i, n] of nodes.entries()) {
    n.result.arrivalMs = arrivals[i]!
    sim.at(arrivals[i]!, () => {
      if (!n.alive) return
      void n.runWorkload(chunks, plan).finally(() => { if (--running === 0) sim.stop() })
    })
  }
  sim.at(s.timeouts.runMs, () => sim.stop())
  const progress = options.onProgress === undefined
    ? undefined
    : setInterval(() => options.onProgress!({ simulatedMs: sim.now, events: sim.events, finished: count - running, nodes: count, wallSeconds: (performance.now() - started) / 1000 }), 10_000)
  try {
    await sim.run()
  } finally {
    clearInterval(progress)
  }
  for (const n of nodes) {
    n.finish()
    if (n.result.startedMs === undefined || n.result.outcome !== 'not-started') continue
    n.result.outcome = 'failed'
    n.result.error = 'still running when the run bound (timeouts.runMs) passed'
  }
  let diagnostics: PolicyDiagnostics | undefined
  if (w.peers) {
    diagnostics = w.diagnostics
    const h = diagnostics.depth.histogram
    for (let i = 0; i < h.length; i++) h[i] ??= 0
    const total = h.reduce((a, n) => a + n, 0)
    diagnostics.depth.mean = total === 0 ? 0 : h.reduce((a, n, i) => a + n * i, 0) / total
    diagnostics.depth.max = Math.max(0, h.length - 1)
    const hits = w.peerGetHits.sort((a, b) => a - b)
    const misses = w.peerGetMisses.sort((a, b) => a - b)
    diagnostics.peerGetMs = { hits: hits.length, hitP50: percentile(hits, 0.5), hitP99: percentile(hits, 0.99), misses: misses.length, missP50: percentile(misses, 0.5), missP99: percentile(misses, 0.99) }
  }
  return {
    result: {
      mode: options.mode,
      nodes: nodes.map(n => n.result),
      origin: { bytesSent: w.origin.bytes, ...w.originStats, samples },
      badPeers: bad.map(b => ({ peerId: b.id, wants: 0, corrupted: b.result.uploadBytes > 0 ? 1 : 0, haves: 0 })),
      hostilePeers: [],
      events,
      wallMs: sim.now,
      cpuBusy: 0,
      // The model has no wire protocol to flood: the chunk server's limits against floods are measured in real runs only.
      notes: s.faults.hostilePeers !== undefined ? ['faults.hostilePeers is not modelled (real runs only): this run has no hostile peers'] : []
    },
    events: sim.events,
    seconds: (performance.now() - started) / 1000,
    heapMB: Math.round(process.memoryUsage().heapUsed / 1e6),
    ...(diagnostics !== undefined ? { diagnostics } : {})
  }
}
