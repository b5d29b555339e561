import type { Connection, PeerId, Stream } from '@libp2p/interface'
import type { Libp2p } from 'libp2p'
import { Codec, encodeChunkAsync } from '../format/codec.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import {
  CHUNK_PROTOCOL, MAX_CLIENT_FRAME, MAX_MEMBERS, clientMessageType, decodeClientMessage, encodeChunkReply, encodeHave, encodeMembers, frameDecoder,
  normalizeRanges, withRequestId, type ByteRange, type ChunkStatus, type ClientMessage, type WantItem
} from './chunk-protocol.ts'
import { ProtocolViolationError } from './errors.ts'
import { messageStreamToDuplex, pipe, Uint8ArrayList } from './libp2p.ts'
import type { SwarmMembers } from './swarm-members.ts'
import { TokenBucket } from '../util/token-bucket.ts'

/**
 * What this node can serve. The agent adapts its verified disk cache (and, for
 * parent requests, its resolver) to this.
 */
export interface LocalChunks {
  /**
   * The chunk's bytes if this node holds them verified, else undefined.
   *
   * `fetch: true` means the requester chose this node as its parent in the
   * chunk's distribution tree: the agent should fetch it (through its own
   * resolver, once: singleflight) and resolve when it lands. `signal` aborts when the requester cancels or the server stops; a
   * requester that merely stopped waiting (it got `pending`) does not abort, so
   * the fetch carries on and its next ask finds the chunk. `from` is the
   * requester's peer id.
   */
  get (digest: Digest, options: { signal: AbortSignal, fetch: boolean, from: string }): Promise<Uint8Array | undefined>
  /** Byte ranges of the pack's stored bytes whose chunks this node holds, verified. */
  held (pack: Digest): Promise<readonly ByteRange[]>
  /** Whether the chunk is worth compressing for the wire (its image stored it compressed). Default: no. */
  compressible? (digest: Digest): boolean
}

const MiB = 1024 * 1024

/**
 * The server's limits, each with the reason for its default. Beyond a limit on
 * chunk requests the answer is `busy` at once rather than a queue: a requester
 * with alternatives should use them. Floods of small frames (availability
 * queries, JOINs) and peers that do not read are read no faster than allowed
 * instead. A hostile peer must not make this node spend memory or CPU in
 * proportion to what it sends (issue 15: floods of HAVE?, JOIN, requests nobody
 * reads, fresh identities).
 */
export const CHUNK_SERVER_DEFAULTS = {
  /** Requests one peer may have in progress (parent waits and availability queries included); beyond it, `busy`. */
  maxConcurrentPerPeer: 64,
  /**
   * Peers served holder requests (no fetch flag) at once; a request from one
   * more peer is `busy`, so a popular holder sheds requesters to their tree
   * parents instead of splitting its uplink among everybody. A peer already
   * being served is not refused (one requester pipelining many chunks is
   * cheap), and parent requests are not limited here: the tree bounds how
   * many children a node has.
   */
  maxHolderPeers: 8,
  /** Longest a requester may make us hold a parent request (its waitMs is capped to this). */
  maxWaitMs: 5000,
  /** Inbound chunk streams per connection. Clients use one; a few more tolerate reconnect races. */
  maxStreamsPerConnection: 4,
  /**
   * Requests in progress over all peers together. Identities are free and
   * loopback and private ranges bypass libp2p's connection limits, so per-peer
   * caps alone multiply with an attacker's identities. Above what a 20-node
   * burst keeps in flight (8 holder peers and 19 children at the client's window
   * of 32: about 860).
   */
  maxConcurrentRequests: 1024,
  /**
   * Bytes queued on one peer's stream that it has not taken yet (beyond its
   * flow-control window). A reply that would go over waits, holding its request
   * slot, until the peer takes some (one always goes when nothing is queued,
   * whatever its size); and the stream is not read meanwhile. A client's window
   * of 32 default (1 MiB) chunks.
   */
  maxQueuedBytesPerPeer: 32 * MiB,
  /**
   * Chunk bytes queued for all peers together, in hand (read, hashed,
   * compressed, waiting for room) or not taken by their streams; beyond, `busy`
   * (a chunk always passes when nothing is queued). Four paused identities
   * asking for compressed 1 MiB chunks took an agent from 417 to 622 MB: per-peer
   * caps multiply with identities. Half a second of a 1 Gbit/s uplink: more
   * queued makes no upload faster, only later.
   */
  maxQueuedBytes: 64 * MiB,
  /**
   * A stream with bytes queued whose peer takes none of them for this long is
   * closed, which ends its requests and frees its bytes. A CPU-starved agent
   * reads late by seconds (2.6 s at worst in a 20-node burst on 2 cores), not ten.
   */
  stallMs: 10_000,
  /**
   * Request bytes received on a stream and not yet handled; beyond, the stream
   * is not read (its flow control stops the peer) until they are. A client's
   * window of requests is a few KB; a flood sent faster than it is handled
   * would otherwise wait here in memory, however much.
   */
  maxUnreadBytes: 64 * 1024,
  /**
   * Availability queries (HAVE?) taken per peer per second, after a burst of
   * `haveBurst`. Beyond, the peer's stream is read no faster (paused: its flow
   * control stops the peer), so its answers come at this rate: a reading
   * attacker drew 75 MB in 20,000 answers. Answering cheaply was not enough:
   * libp2p spends more per tiny frame (a yamux frame, a window update, Noise)
   * than shoal does. A reader asks a peer about each pack it reads at most every
   * 15 s (availabilityTtlMs): 32/s is 480 packs (7.5 GiB) read at once; the
   * burst covers a mount's first reads. A peer still over its rate after
   * stallMs with more than a quarter of maxUnreadBytes of requests waiting is
   * flooding, not reading a big image: its stream is closed.
   */
  haveQueriesPerSecond: 32,
  haveBurst: 128,
  /**
   * How long one scan of a pack's availability answers every query for it
   * (peers trust an answer for 5 s). Scanning every chunk for each of 40,000
   * queries blocked the event loop for 33.5 s.
   */
  haveCacheMs: 1000,
  /** Packs whose availability answer is cached (the least recently asked go first); a few KB each. */
  haveCachePacks: 256,
  /**
   * Availability scans (answers not cached) over all peers per second; beyond,
   * the last answer however old, or an empty one. Fresh identities asking
   * about random packs cannot make the node scan without bound.
   */
  haveScansPerSecond: 64,
  /**
   * Ranges in an availability answer (the first ones): bounds its size (about
   * 4 KB). Holdings are runs (a complete pack is one range); a peer holding a
   * more fragmented pack is asked for a chunk beyond them as a parent instead.
   */
  maxHaveRanges: 1024,
  /**
   * JOINs (up to 32 keys each) taken per peer per second, after a burst of
   * `joinBurst`; beyond, as for availability queries. A mount sends one per
   * layer to each peer it is connected to.
   */
  joinsPerSecond: 8,
  joinBurst: 64,
  /**
   * CANCELs taken per peer per second, after a burst of `cancelBurst`; beyond,
   * as for availability queries (the WANTs behind them wait too). A WANT
   * cancelled at once costs this node a request's whole set-up (a parent request
   * for a digest it does not know waits to learn it, with timers and listeners)
   * and frees its slot at once, so the per-peer cap did not bound the churn: a
   * reading peer sending WANT then CANCEL in a loop took 45,000 parent requests
   * in 20 s, the agent's heap to 252 MB and its RSS from 170 to 370 MB,
   * never given back; at 128/s it still kept 35 MB (21 %). A client cancels the
   * hedges that lost and the reads that were abandoned: at most its window (32)
   * at once, which the burst takes, and no faster than it asks.
   */
  cancelsPerSecond: 64,
  cancelBurst: 256
} as const

/** What the admission of a want looks at: requests in progress, from its peer and from everybody. */
export interface ServerLoad {
  /** Requests in progress from the want's peer (parent waits and availability queries included). */
  peerActive: number
  /** Of those, holder requests (no fetch flag). */
  peerHolder: number
  /** Peers with holder requests in progress. */
  holderPeers: number
  /** Requests in progress from all peers. */
  active: number
}

/**
 * Whether the server takes on a want (FETCH: a parent request) or answers `busy`:
 * beyond its peer's maxConcurrentPerPeer; a holder request from a peer not already
 * served when maxHolderPeers are (`busy-holders`); beyond maxConcurrentRequests in
 * all. Pure, so the simulation model admits with it too.
 */
export function admitWant (limits: Record<'maxConcurrentPerPeer' | 'maxHolderPeers' | 'maxConcurrentRequests', number>, load: ServerLoad, fetch: boolean): 'admitted' | 'busy-peer' | 'busy-holders' | 'busy-all' {
  if (load.peerActive >= limits.maxConcurrentPerPeer) return 'busy-peer'
  if (!fetch && load.peerHolder === 0 && load.holderPeers >= limits.maxHolderPeers) return 'busy-holders'
  if (load.active >= limits.maxConcurrentRequests) return 'busy-all'
  return 'admitted'
}

/**
 * The read loop lets the event loop run after this long: frames that arrived
 * together are handled in one chain of microtasks, and 40,000 availability
 * queries kept reads of the node's own files waiting for seconds.
 */
const SLICE_MS = 5
/** Replies up to this size sent in one turn of the event loop go out together: a write (and an encryption) per reply was most of a flood's cost. */
const COALESCE_BYTES = 64 * 1024
/**
 * Chunk bytes re-hashed per turn of the event loop (1.5 ms a MiB): 64 chunks of
 * 1 MiB answered together blocked it for a tenth of a second. Not on the thread
 * pool: WebCrypto copies its input, all of it at once. Not one chunk per turn
 * either: sending a MiB at a time between the peer's small frames makes
 * @libp2p/pnet's xsalsa20 regrow its WASM memory (64 MB at most, shared by
 * every connection) each time, and private-network connections died after
 * 128 MB. (In bigger batches they die after about 512 MB: that growth is
 * xsalsa20's, not ours.)
 */
const HASH_BYTES_PER_TURN = 8 * 1024 * 1024
/**
 * Chunks up to this size travel raw even when their image stored them compressed.
 * Compressing costs a trip through libuv's thread pool here and another one to
 * decompress at the requester, each behind the event loop's other work: on the
 * starved agents of a real 20-node burst, hundreds of ms per hop for a small file's
 * chunk, which its reader waits for, to save a few KB (under a millisecond of a
 * 100 Mbit/s link).
 */
const COMPRESS_MIN_BYTES = 64 * 1024
/** Idle peers whose rate buckets are kept (a few hundred bytes each). */
const IDLE_PEERS = 1024

export interface ChunkServerOptions extends Partial<Record<keyof typeof CHUNK_SERVER_DEFAULTS, number>> {
  local: LocalChunks
  /** Total upload rate; beyond it, `busy`. Default unlimited. */
  uploadBytesPerSecond?: number
  /** Where JOINs from peers are recorded (the agent's pack router reads it). Default: ignored. */
  members?: SwarmMembers
  now?: () => number
}

export interface ChunkServerStats {
  /** Chunk items received. */
  requests: number
  served: number
  /** Bytes sent as chunk data (compressed where they travelled compressed). */
  bytesServed: number
  dontHave: number
  /** Every busy answer, whichever limit gave it. */
  busy: number
  pending: number
  /** Parent requests: a child asked us to fetch a chunk if we lack it. */
  parentRequests: number
  /** Held chunks that failed our own re-hash (disk corruption): answered dont-have. */
  localCorruption: number
  /** Streams reset because the peer broke the protocol. */
  violations: number
  /** Busy because the requests in progress over all peers reached maxConcurrentRequests. */
  busyAllPeers: number
  /** Busy because the bytes queued for all peers reached maxQueuedBytes. */
  busyQueueFull: number
  /** Availability queries answered empty (over the peer's or all peers' request cap), or from a stale scan (over the scan rate). */
  haveLimited: number
  /** Frames (HAVE?, JOIN, CANCEL) whose reading waited for the peer's rate. */
  throttled: number
  /** Streams closed because their peer stayed over its rate for stallMs. */
  overRate: number
  /** Times a stream's requests went unread until the peer took the answers already queued. */
  readsPaused: number
  /** Streams closed because the peer took none of the bytes queued for it for stallMs. */
  stalled: number
  /** Now: chunk bytes queued for peers (in hand or not taken by their streams). */
  queuedBytes: number
  /** Now: requests in progress over all peers. */
  inProgress: number
}

type Registrar = Pick<Libp2p, 'handle' | 'unhandle'>

/** What the server keeps per peer while it has a stream open or a request in progress. */
interface PeerState {
  readonly id: string
  streams: number
  /** Requests in progress (wants, including replies not yet taken, and availability queries). */
  active: number
  /** Holder requests in progress. */
  holder: number
  /** Chunk bytes queued for it: replies in hand, and its streams' backlogs. */
  queued: number
  readonly haveRate: TokenBucket
  readonly joinRate: TokenBucket
  readonly cancelRate: TokenBucket
}

interface StreamState {
  readonly stream: Stream
  readonly remote: PeerId
  readonly peer: PeerState
  /** Items in progress by id, so CANCEL can abort them. */
  readonly items: Map<number, AbortController>
  /** Everything still to answer, so a half-closed stream is closed only when it is done. */
  readonly work: Set<Promise<void>>
  /** Bytes handed to the stream so far. */
  handed: number
  /** The stream's writeBufferLength when last looked at (counted in the peer's and the server's queued bytes). */
  backlog: number
  /**
   * Replies not yet taken by the peer, in the order sent, each with the value
   * `handed` reached at its end: the stream's buffer is FIFO, so a reply has
   * left it once handed - backlog reaches that. From `head` on.
   */
  readonly unflushed: Array<{ end: number, done: (() => void) | undefined }>
  head: number
  /** When the backlog last shrank, or began. */
  progressAt: number
  stallTimer: NodeJS.Timeout | undefined
  /** Set while the read loop waits for the peer to take what is queued. */
  resume: (() => void) | undefined
  /** Replies waiting for room (maxQueuedBytesPerPeer): woken when the peer takes some. */
  roomWaiters: Array<() => void>
  /** Small replies of this turn, sent together (setImmediate), and their bytes. */
  pending: Array<Uint8Array | Uint8ArrayList>
  pendingBytes: number
  /** Request bytes received and not yet handled, and whether reading is paused for them. */
  unread: number
  inputPaused: boolean
  /** Set while the read loop waits for the peer's rate. */
  throttled: boolean
  /** Since when every frame of this rate-limited kind had to wait (0: the last one did not). */
  overRateSince: number
  /** Whether the stream is paused now (for unread input, its rate, or output not taken). */
  readPaused: boolean
  closed: boolean
}

interface CachedHave { at: number, frame: Promise<Uint8Array> }

/**
 * Serves `/shoal/chunks/2.0.0`. Every item is answered independently, as soon
 * as it is ready. Limits that protect this node answer `busy` at once instead
 * of queueing: a requester with alternatives should use them.
 *
 * Output is watched per stream, not per reply: one listener per stream follows
 * how much of what we sent the peer has taken. A data reply holds its request's
 * slot until the peer took it, and a stream whose peer has `maxConcurrentPerPeer`
 * replies (of any kind) or `maxQueuedBytesPerPeer` bytes not taken is not read
 * until it takes some: a peer that sends requests and reads nothing gets a
 * bounded number of answers, then its stream is closed after `stallMs`. (Waiting
 * on the stream's drain for each reply put a listener per queued `busy` on one
 * signal: quadratic, a core pinned for minutes.)
 */
export class ChunkServer {
  readonly stats: ChunkServerStats = {
    requests: 0,
    served: 0,
    bytesServed: 0,
    dontHave: 0,
    busy: 0,
    pending: 0,
    parentRequests: 0,
    localCorruption: 0,
    violations: 0,
    busyAllPeers: 0,
    busyQueueFull: 0,
    haveLimited: 0,
    throttled: 0,
    overRate: 0,
    readsPaused: 0,
    stalled: 0,
    queuedBytes: 0,
    inProgress: 0
  }

  private readonly registrar: Registrar
  private readonly local: LocalChunks
  private readonly members: SwarmMembers | undefined
  private readonly limits: { readonly [K in keyof typeof CHUNK_SERVER_DEFAULTS]: number }
  private readonly now: () => number
  private readonly bucket: TokenBucket
  private readonly haveScans: TokenBucket
  private readonly peers = new Map<string, PeerState>()
  /** Peers with nothing open, kept a while (the least recently idle go first) so that reconnecting does not refill their rates. */
  private readonly idlePeers = new Map<string, PeerState>()
  /** Peers with holder requests in progress. */
  private holderPeers = 0
  /** Requests in progress over all peers. */
  private active = 0
  /** Chunk bytes queued over all peers. */
  private queued = 0
  private readonly haveCache = new Map<Digest, CachedHave>()
  /** Bytes hashing may still take this turn, chunks waiting for a later turn, and whether a turn is scheduled (see `hash`). */
  private hashBudget = HASH_BYTES_PER_TURN
  private readonly hashQueue: Array<{ bytes: number, go: () => void }> = []
  private hashTick = false
  private readonly streams = new Set<StreamState>()
  /** The stream each peer sent its JOIN on: where it hears about newcomers. */
  private readonly joined = new Map<string, StreamState>()
  private readonly stopping = new AbortController()

  constructor (registrar: Registrar, options: ChunkServerOptions) {
    this.registrar = registrar
    this.local = options.local
    this.members = options.members
    const limits = { ...CHUNK_SERVER_DEFAULTS }
    for (const key of Object.keys(limits) as Array<keyof typeof CHUNK_SERVER_DEFAULTS>) {
      const value = options[key]
      if (value !== undefined) (limits as Record<string, number>)[key] = value
    }
    this.limits = limits
    this.now = options.now ?? performance.now.bind(performance)
    this.bucket = new TokenBucket(options.uploadBytesPerSecond ?? Infinity, { now: this.now })
    this.haveScans = new TokenBucket(limits.haveScansPerSecond, { now: this.now })
  }

  async start (): Promise<void> {
    await this.registrar.handle(CHUNK_PROTOCOL, (stream, connection) => this.serve(stream, connection), {
      maxInboundStreams: this.limits.maxStreamsPerConnection
    })
  }

  /** Refuses new streams, resets open ones and abandons the work in progress. Not restartable. */
  async stop (): Promise<void> {
    const reason = new Error('chunk server stopped')
    this.stopping.abort(reason)
    await this.registrar.unhandle(CHUNK_PROTOCOL)
    for (const state of this.streams) {
      for (const controller of state.items.values()) controller.abort(reason)
      state.stream.abort(reason)
    }
  }

  private async serve (stream: Stream, connection: Connection): Promise<void> {
    keepReceiveWindow(stream)
    const peer = this.peerState(connection.remotePeer.toString())
    peer.streams++
    const state: StreamState = {
      stream,
      remote: connection.remotePeer,
      peer,
      items: new Map(),
      work: new Set(),
      handed: 0,
      backlog: 0,
      unflushed: [],
      head: 0,
      progressAt: 0,
      stallTimer: undefined,
      resume: undefined,
      roomWaiters: [],
      pending: [],
      pendingBytes: 0,
      unread: 0,
      inputPaused: false,
      throttled: false,
      overRateSince: 0,
      readPaused: false,
      closed: false
    }
    const abandon = (): void => { for (const controller of state.items.values()) controller.abort(new Error('chunk stream ended')) }
    // 'close' means both directions are done or the connection died: nobody is left to answer.
    const onClose = (): void => {
      abandon()
      this.closed(state)
    }
    // The stream's own 'drain' handler sends more in a microtask queued before ours: look after it.
    const onDrain = (): void => { queueMicrotask(() => this.update(state)) }
    const onIdle = (): void => this.update(state)
    // After messageStreamToDuplex's own listener: counts what it queues for the read loop.
    const onMessage = (event: { data: Uint8Array | Uint8ArrayList }): void => {
      state.unread += event.data.byteLength
      if (!state.inputPaused && state.unread > this.limits.maxUnreadBytes) {
        state.inputPaused = true
        this.pauseReads(state)
      }
    }
    stream.addEventListener('close', onClose, { once: true })
    stream.addEventListener('drain', onDrain)
    stream.addEventListener('idle', onIdle)
    const source = messageStreamToDuplex(stream).source
    stream.addEventListener('message', onMessage)
    this.streams.add(state)
    try {
      await pipe(
        source,
        frameDecoder(MAX_CLIENT_FRAME),
        async (frames: AsyncIterable<Uint8ArrayList>) => {
          let slice = performance.now()
          for await (const frame of frames) {
            state.unread -= 4 + frame.byteLength
            if (state.inputPaused && state.unread <= this.limits.maxUnreadBytes / 2) {
              state.inputPaused = false
              this.pauseReads(state)
            }
            if (this.congested(state)) await this.uncongested(state)
            const type = clientMessageType(frame)
            const rate = type === 'have-query' ? state.peer.haveRate : type === 'join' ? state.peer.joinRate : type === 'cancel' ? state.peer.cancelRate : undefined
            if (rate !== undefined) await this.throttle(state, rate)
            if (state.closed) return
            this.dispatch(state, decodeClientMessage(frame))
            if (performance.now() - slice > SLICE_MS) {
              await new Promise(resolve => setImmediate(resolve))
              slice = performance.now()
            }
          }
        }
      )
      // The requester half-closed: answer what is in progress, then close our side.
      await Promise.allSettled(state.work)
      await stream.close({ signal: AbortSignal.timeout(5000) }).catch(() => stream.abort(new Error('close timed out')))
    } catch (err) {
      if (err instanceof ProtocolViolationError) {
        this.stats.violations++
        stream.abort(err)
      }
      // Anything else is the stream dying under us (reset, connection closed): nothing to answer.
    } finally {
      abandon()
      stream.removeEventListener('close', onClose)
      stream.removeEventListener('drain', onDrain)
      stream.removeEventListener('idle', onIdle)
      stream.removeEventListener('message', onMessage)
      this.closed(state)
      this.streams.delete(state)
      if (this.joined.get(peer.id) === state) this.joined.delete(peer.id)
      peer.streams--
      this.forgetIfIdle(peer)
    }
  }

  private peerState (id: string): PeerState {
    let peer = this.peers.get(id)
    if (peer === undefined) {
      peer = this.idlePeers.get(id)
      this.idlePeers.delete(id)
    }
    if (peer !== undefined) this.peers.set(id, peer)
    else {
      peer = {
        id,
        streams: 0,
        active: 0,
        holder: 0,
        queued: 0,
        haveRate: new TokenBucket(this.limits.haveQueriesPerSecond, { capacity: this.limits.haveBurst, now: this.now }),
        joinRate: new TokenBucket(this.limits.joinsPerSecond, { capacity: this.limits.joinBurst, now: this.now }),
        cancelRate: new TokenBucket(this.limits.cancelsPerSecond, { capacity: this.limits.cancelBurst, now: this.now })
      }
      this.peers.set(id, peer)
    }
    return peer
  }

  /** A peer's state moves to the idle ones once it has no stream or request left: the live map is as small as the live peers. */
  private forgetIfIdle (peer: PeerState): void {
    if (peer.streams !== 0 || peer.active !== 0 || peer.queued !== 0 || this.peers.get(peer.id) !== peer) return
    this.peers.delete(peer.id)
    this.idlePeers.set(peer.id, peer)
    if (this.idlePeers.size > IDLE_PEERS) this.idlePeers.delete(this.idlePeers.keys().next().value!)
  }

  private dispatch (state: StreamState, message: ClientMessage): void {
    switch (message.type) {
      case 'want':
        for (const item of message.items) {
          if (state.items.has(item.id)) throw new ProtocolViolationError(`request id ${item.id} reused while still in progress`)
          this.track(state, this.answer(state, item))
        }
        break
      case 'cancel':
        state.items.get(message.id)?.abort(new Error('cancelled by the requester'))
        break
      case 'have-query':
        this.track(state, this.answerHave(state, message.id, message.pack))
        break
      case 'join':
        this.join(state, message.keys, message.addresses)
        break
    }
  }

  /**
   * Peer exchange (SwarmMembers.exchange): the joiner hears whom we know in
   * each swarm, and some of those hear of the joiner, on the streams they
   * opened to us. With everyone
   * bootstrapping from the same seeds, a burst's nodes learn each other within
   * a round trip or two, however slow the DHT is.
   */
  private join (state: StreamState, keys: Digest[], addresses: string[]): void {
    if (this.members === undefined) return
    this.joined.set(state.peer.id, state)
    const newcomer = [{ id: state.peer.id, addresses }]
    for (const key of keys) {
      const { answer, passOn } = this.members.exchange(key, state.remote, addresses)
      for (let i = 0; i < answer.length; i += MAX_MEMBERS) {
        this.send(state, encodeMembers(key, answer.slice(i, i + MAX_MEMBERS)))
      }
      for (const id of passOn) {
        const other = this.joined.get(id)
        // A peer that does not take what we send it already hears no more.
        if (other !== undefined && !this.congested(other)) this.send(other, encodeMembers(key, newcomer))
      }
    }
  }

  private track (state: StreamState, work: Promise<void>): void {
    state.work.add(work)
    void work.finally(() => state.work.delete(work))
  }

  private async answer (state: StreamState, item: WantItem): Promise<void> {
    this.stats.requests++
    const peer = state.peer
    const admission = admitWant(this.limits, { peerActive: peer.active, peerHolder: peer.holder, holderPeers: this.holderPeers, active: this.active }, item.fetch)
    if (admission !== 'admitted') {
      if (admission === 'busy-all') this.stats.busyAllPeers++
      this.reply(state, item.id, 'busy')
      return
    }
    if (this.stopping.signal.aborted) return
    this.acquire(peer, !item.fetch)
    // Aborted by a CANCEL, by the stream's end, or by stop(). Not AbortSignal.any() with a
    // server-wide signal: each such signal stays among the long-lived one's dependants until
    // a collection finds it (about 1 KB a request on Node 24), for every request ever made.
    const controller = new AbortController()
    state.items.set(item.id, controller)
    const signal = controller.signal
    let inHand = 0
    try {
      const found = await this.lookup(item, peer.id, signal)
      if (signal.aborted) return // cancelled: the requester does not want an answer
      if (found === 'pending' || found === undefined) {
        this.reply(state, item.id, found ?? 'dont-have')
        return
      }
      // Counted first, before hashing and compressing them: a refused chunk costs nothing more.
      if (!this.reserve(peer, found.length)) {
        this.stats.busyQueueFull++
        this.reply(state, item.id, 'busy')
        return
      }
      inHand = found.length
      if (found.length !== item.length || await this.hash(found) !== item.digest) {
        // Never pass on bytes we cannot vouch for; the agent's cache will find out on its own read.
        this.stats.localCorruption++
        this.reply(state, item.id, 'dont-have')
        return
      }
      // On libuv's thread pool, at a fast level: a chunk compressed once per upload, not stored.
      // Not a small one: its bytes saved are worth less than the two thread-pool round trips.
      const wire = found.length > COMPRESS_MIN_BYTES && this.local.compressible?.(item.digest) === true ? await encodeChunkAsync(found, 'zstd', 1) : { codec: Codec.none, bytes: found }
      if (signal.aborted) return
      if (!this.bucket.tryTake(wire.bytes.length)) {
        this.reply(state, item.id, 'busy')
        return
      }
      await this.room(state, wire.bytes.length)
      if (signal.aborted) return
      this.stats.served++
      this.stats.bytesServed += wire.bytes.length
      // From here the bytes count as the stream's backlog until the peer takes them.
      this.release(peer, inHand)
      inHand = 0
      // The slot is held until the peer took the reply: what bounds the requests a slow reader keeps here.
      await new Promise<void>(resolve => this.send(state, encodeChunkReply(item.id, 'data', wire.bytes, wire.codec === Codec.zstd), resolve))
    } catch {
      if (!signal.aborted) this.reply(state, item.id, 'dont-have')
    } finally {
      this.release(peer, inHand)
      state.items.delete(item.id)
      this.done(peer, !item.fetch)
    }
  }

  /** SHA-256 of a chunk about to be sent, within HASH_BYTES_PER_TURN per turn of the event loop (one chunk always fits). */
  private async hash (bytes: Uint8Array): Promise<Digest> {
    this.scheduleHashTurn()
    const fits = (): boolean => this.hashBudget >= bytes.length || this.hashBudget === HASH_BYTES_PER_TURN
    if (this.hashQueue.length > 0 || !fits()) await new Promise<void>(go => this.hashQueue.push({ bytes: bytes.length, go }))
    else this.hashBudget -= bytes.length
    return sha256(bytes)
  }

  /** The next turn refills the budget and lets waiting chunks through, in order, while it lasts. */
  private scheduleHashTurn (): void {
    if (this.hashTick) return
    this.hashTick = true
    setImmediate(() => {
      this.hashTick = false
      this.hashBudget = HASH_BYTES_PER_TURN
      while (this.hashQueue.length > 0 && (this.hashBudget >= this.hashQueue[0]!.bytes || this.hashBudget === HASH_BYTES_PER_TURN)) {
        const next = this.hashQueue.shift()!
        this.hashBudget -= next.bytes
        next.go()
      }
      if (this.hashQueue.length > 0) this.scheduleHashTurn()
    })
  }

  /**
   * Waits (the stream paused, so its flow control stops the peer) until the
   * peer's rate admits one more frame of this kind. A peer that has been over
   * its rate for stallMs, with requests piling up unread, is no client of ours:
   * its stream is closed.
   */
  private async throttle (state: StreamState, rate: TokenBucket): Promise<void> {
    let wait = rate.waitMs()
    if (wait === 0) {
      state.overRateSince = 0
      rate.tryTake(1)
      return
    }
    this.stats.throttled++
    state.overRateSince ||= this.now()
    state.throttled = true
    this.pauseReads(state)
    while (wait > 0 && !state.closed) {
      // Requests waiting: those read and not handled, and those the paused stream holds.
      if (this.now() - state.overRateSince > this.limits.stallMs && state.unread + state.stream.readBufferLength > this.limits.maxUnreadBytes / 4) {
        this.stats.overRate++
        state.stream.abort(new Error(`the peer asked over its rate for ${this.limits.stallMs} ms`))
        break
      }
      await new Promise(resolve => setTimeout(resolve, wait))
      wait = rate.waitMs()
    }
    rate.tryTake(1)
    state.throttled = false
    this.pauseReads(state)
  }

  /** Bytes, undefined (not held), or 'pending' (a fetch for a child still running when the wait ran out). */
  private async lookup (item: WantItem, from: string, signal: AbortSignal): Promise<Uint8Array | undefined | 'pending'> {
    if (!item.fetch) return await this.local.get(item.digest, { signal, fetch: false, from })
    this.stats.parentRequests++
    const fetching = this.local.get(item.digest, { signal, fetch: true, from })
    const waitMs = Math.min(item.waitMs, this.limits.maxWaitMs)
    let timer: NodeJS.Timeout | undefined
    const expired = new Promise<'pending'>(resolve => { timer = setTimeout(() => resolve('pending'), waitMs) })
    try {
      return await Promise.race([fetching, expired])
    } finally {
      clearTimeout(timer)
    }
  }

  /**
   * Availability, from a per-pack answer cached for haveCacheMs (one scan of the
   * pack's chunks serves every query meanwhile), counted toward the peer's
   * request cap (and read at the peer's rate: `throttle`). Over the cap, the
   * answer is empty: the asker then takes us for holding nothing of the pack for
   * a while, and asks us as a parent if at all.
   */
  private async answerHave (state: StreamState, id: number, pack: Digest): Promise<void> {
    const peer = state.peer
    if (peer.active >= this.limits.maxConcurrentPerPeer || this.active >= this.limits.maxConcurrentRequests) {
      this.stats.haveLimited++
      this.send(state, encodeHave(id, pack, []))
      return
    }
    this.acquire(peer, false)
    try {
      const frame = await this.availability(pack)
      this.send(state, frame === undefined ? encodeHave(id, pack, []) : withRequestId(frame, id))
    } finally {
      this.done(peer, false)
    }
  }

  /** The encoded answer for `pack` (request id 0), from the cache when fresh; undefined when no scan is allowed now and none was cached. */
  private async availability (pack: Digest): Promise<Uint8Array | undefined> {
    const now = this.now()
    const cached = this.haveCache.get(pack)
    if (cached !== undefined) {
      this.haveCache.delete(pack) // to the end: the most recently asked
      this.haveCache.set(pack, cached)
      if (now - cached.at < this.limits.haveCacheMs) return await cached.frame
    }
    if (!this.haveScans.tryTake(1)) {
      this.stats.haveLimited++
      return cached === undefined ? undefined : await cached.frame
    }
    const frame = this.local.held(pack)
      .catch(() => [])
      .then(ranges => encodeHave(0, pack, normalizeRanges(ranges).slice(0, this.limits.maxHaveRanges)))
    this.haveCache.delete(pack)
    this.haveCache.set(pack, { at: now, frame })
    if (this.haveCache.size > this.limits.haveCachePacks) this.haveCache.delete(this.haveCache.keys().next().value!)
    return await frame
  }

  private reply (state: StreamState, id: number, status: ChunkStatus): void {
    if (status === 'busy') this.stats.busy++
    else if (status === 'dont-have') this.stats.dontHave++
    else if (status === 'pending') this.stats.pending++
    this.send(state, encodeChunkReply(id, status))
  }

  private acquire (peer: PeerState, holder: boolean): void {
    peer.active++
    this.active++
    this.stats.inProgress = this.active
    if (holder && peer.holder++ === 0) this.holderPeers++
  }

  private done (peer: PeerState, holder: boolean): void {
    peer.active--
    this.active--
    this.stats.inProgress = this.active
    if (holder && --peer.holder === 0) this.holderPeers--
    this.forgetIfIdle(peer)
  }

  /** Counts `bytes` in hand for `peer` if all peers' cap allows (always when nothing is queued, so any chunk can pass). */
  private reserve (peer: PeerState, bytes: number): boolean {
    if (this.queued > 0 && this.queued + bytes > this.limits.maxQueuedBytes) return false
    this.count(peer, bytes)
    return true
  }

  /** Until the stream has room for `bytes` more (maxQueuedBytesPerPeer), or is gone. */
  private async room (state: StreamState, bytes: number): Promise<void> {
    while (!state.closed && state.backlog > 0 && state.backlog + bytes > this.limits.maxQueuedBytesPerPeer) {
      await new Promise<void>(resolve => state.roomWaiters.push(resolve))
    }
  }

  private release (peer: PeerState, bytes: number): void {
    if (bytes !== 0) this.count(peer, -bytes)
  }

  private count (peer: PeerState, bytes: number): void {
    peer.queued += bytes
    this.queued += bytes
    this.stats.queuedBytes = this.queued
  }

  /**
   * Hands a frame to the stream; `done` runs once the peer has taken it (or the
   * stream is gone). Never waits: the stream's buffer takes everything, and what
   * it holds is bounded by the request caps and by not reading a congested stream.
   */
  private send (state: StreamState, data: Uint8Array | Uint8ArrayList, done?: () => void): void {
    if (state.closed) {
      done?.()
      return
    }
    state.handed += data.byteLength
    state.unflushed.push({ end: state.handed, done })
    state.pending.push(data)
    state.pendingBytes += data.byteLength
    if (data.byteLength > COALESCE_BYTES) this.flush(state)
    else if (state.pending.length === 1) setImmediate(() => this.flush(state))
  }

  /** Hands this turn's replies to the stream at once. */
  private flush (state: StreamState): void {
    if (state.pending.length === 0 || state.closed) return
    const parts = state.pending
    state.pending = []
    state.pendingBytes = 0
    try {
      state.stream.send(parts.length === 1 ? parts[0]! : new Uint8ArrayList(...parts))
    } catch {
      // The stream closed or was reset: its 'close' releases everything.
    }
    this.update(state)
  }

  /** Looks at how much of what we sent the peer has taken: counts, replies taken, stall timer, paused reads. */
  private update (state: StreamState): void {
    if (state.closed) {
      state.pending = []
      state.pendingBytes = 0
    }
    const backlog = state.closed ? 0 : state.stream.writeBufferLength + state.pendingBytes
    if (backlog !== state.backlog) {
      const taken = backlog < state.backlog
      if (taken || state.backlog === 0) state.progressAt = this.now()
      this.count(state.peer, backlog - state.backlog)
      state.backlog = backlog
      if (taken && state.roomWaiters.length > 0) {
        const waiting = state.roomWaiters
        state.roomWaiters = []
        for (const wake of waiting) wake()
      }
    }
    const taken = state.handed - backlog
    const queue = state.unflushed
    while (state.head < queue.length && queue[state.head]!.end <= taken) queue[state.head++]!.done?.()
    if (state.head === queue.length) {
      queue.length = 0
      state.head = 0
    } else if (state.head >= 1024 && state.head * 2 >= queue.length) {
      queue.splice(0, state.head)
      state.head = 0
    }
    if (backlog > state.pendingBytes && !state.closed) {
      state.stallTimer ??= this.stallTimer(state, this.limits.stallMs)
    } else if (state.stallTimer !== undefined) {
      clearTimeout(state.stallTimer)
      state.stallTimer = undefined
    }
    if (state.resume !== undefined && !this.congested(state)) {
      const resume = state.resume
      state.resume = undefined
      resume()
    }
  }

  private stallTimer (state: StreamState, ms: number): NodeJS.Timeout {
    const timer = setTimeout(() => {
      state.stallTimer = undefined
      if (state.closed || state.backlog <= state.pendingBytes) return
      const idle = this.now() - state.progressAt
      if (idle < this.limits.stallMs) {
        state.stallTimer = this.stallTimer(state, this.limits.stallMs - idle)
        return
      }
      this.stats.stalled++
      state.stream.abort(new Error(`the peer took none of ${state.backlog} queued bytes for ${Math.round(idle)} ms`))
    }, ms)
    timer.unref()
    return timer
  }

  /** The stream ended: everything it held is released and nothing waits on it any more. */
  private closed (state: StreamState): void {
    if (state.closed) return
    state.closed = true
    this.update(state)
    const waiting = state.roomWaiters
    state.roomWaiters = []
    for (const wake of waiting) wake()
  }

  /** Whether the peer has so much not taken yet that its stream is not read until it takes some. */
  private congested (state: StreamState): boolean {
    // Replies of this turn not sent yet are no sign of a peer that does not read.
    return state.backlog > state.pendingBytes && (state.unflushed.length - state.head >= this.limits.maxConcurrentPerPeer || state.backlog > this.limits.maxQueuedBytesPerPeer)
  }

  /**
   * Stops reading the stream (its flow control then stops the peer) until the
   * peer has taken enough of what is queued; closed after stallMs if it takes nothing.
   */
  private async uncongested (state: StreamState): Promise<void> {
    this.stats.readsPaused++
    const taken = new Promise<void>(resolve => { state.resume = resolve })
    this.pauseReads(state)
    await taken
    this.pauseReads(state)
  }

  /** Pauses the stream while its input is over maxUnreadBytes or the read loop waits (for the peer's rate, or for output to be taken), else resumes it. */
  private pauseReads (state: StreamState): void {
    const pause = state.inputPaused || state.throttled || state.resume !== undefined
    if (pause === state.readPaused || state.closed) return
    try {
      if (pause) state.stream.pause()
      else state.stream.resume()
      state.readPaused = pause
    } catch {
      // closing: the read loop ends on its own
    }
  }
}

/**
 * Requests are small: the receive window of a stream we serve need not grow.
 * Yamux doubles a window up to 16 MiB for a peer that sends fast, and a flood of
 * tiny frames that large cost the node a second of yamux and Noise work (a frame
 * and a window update each) before shoal saw any of it. Yamux internals, left
 * alone when absent.
 */
function keepReceiveWindow (stream: Stream): void {
  const yamux = stream as unknown as { maxStreamWindowSize?: unknown, recvWindow?: unknown }
  if (typeof yamux.maxStreamWindowSize === 'number' && typeof yamux.recvWindow === 'number') yamux.maxStreamWindowSize = yamux.recvWindow
}
