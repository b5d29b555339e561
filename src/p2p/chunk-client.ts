import { promisify } from 'node:util'
import { zstdDecompress } from 'node:zlib'
import type { PeerId, Stream } from '@libp2p/interface'
import type { Libp2p } from 'libp2p'
import type { Uint8ArrayList } from 'uint8arraylist'
import type { Digest } from '../oci/digest.ts'
import {
  CHUNK_PROTOCOL, MAX_BATCH, MAX_CHUNK_BYTES, MAX_SERVER_FRAME, decodeServerMessage, encodeCancel, encodeHaveQuery, encodeJoin, encodeWant, frameDecoder,
  MAX_JOIN_KEYS, normalizeRanges, type ByteRange, type ServerMessage, type SwarmMember, type WantItem
} from './chunk-protocol.ts'
import { PeerUnavailableError, ProtocolViolationError } from './errors.ts'
import { messageStreamToDuplex, pipe } from './libp2p.ts'

const zstdDecompressAsync = promisify(zstdDecompress)

type MembersHandler = (key: Digest, members: SwarmMember[], from: PeerId) => void

export type ChunkReply =
  | { status: 'data', bytes: Uint8Array }
  | { status: 'dont-have' | 'busy' | 'pending' }

export interface WantOptions {
  signal: AbortSignal
  /** Ask the peer, as our parent in the chunk's tree, to fetch the chunk if it lacks it. */
  fetch: boolean
  /** How long the parent may hold the request while its fetch runs. */
  waitMs: number
}

/** What the peer chunk source needs from a client; tests substitute their own. */
export interface ChunkRequester {
  want (peer: PeerId, chunk: { digest: Digest, length: number }, options: WantOptions): Promise<ChunkReply>
  have (peer: PeerId, pack: Digest, options: { signal: AbortSignal }): Promise<ByteRange[]>
  disconnect (peer: PeerId): Promise<void>
}

export interface ChunkClientOptions {
  /** Deadline for dialling a peer and negotiating the protocol, and for it to take our request frames. Default 2000. */
  dialTimeoutMs?: number
  /** Most unanswered wants per peer; more wait here. Keep it below the servers' per-peer cap. Default 32. */
  window?: number
  /** Swarm members a peer told us about (answering our JOIN, or pushing a newcomer). Default: ignored. */
  onMembers?: (key: Digest, members: SwarmMember[], from: PeerId) => void
}

export interface ChunkClientStats {
  /** Chunk requests made. */
  wants: number
  /** WANT frames sent: wants / wantFrames is the batching achieved. */
  wantFrames: number
  /** Streams opened (one per peer unless a stream died). */
  streams: number
}

type Dialer = Pick<Libp2p, 'dialProtocol' | 'hangUp'>

/**
 * The requesting side of `/shoal/chunks/1.0.0`: one long-lived stream per peer
 * (a stream per chunk would cost a protocol negotiation each time, STACK.md #7),
 * with requests multiplexed by id. Wants issued in the same event-loop turn for
 * the same peer leave as one WANT frame.
 *
 * The client only moves bytes; it does not judge them. Deadlines come from the
 * caller's signal, and verification is the peer chunk source's job.
 */
export class ChunkClient implements ChunkRequester {
  readonly stats: ChunkClientStats = { wants: 0, wantFrames: 0, streams: 0 }
  private readonly dialer: Dialer
  private readonly dialTimeoutMs: number
  private readonly window: number
  private readonly onMembers: MembersHandler
  private readonly sessions = new Map<string, Session>()

  constructor (dialer: Dialer, options: ChunkClientOptions = {}) {
    this.dialer = dialer
    this.onMembers = options.onMembers ?? (() => {})
    this.dialTimeoutMs = options.dialTimeoutMs ?? 2000
    this.window = options.window ?? 32
  }

  want (peer: PeerId, chunk: { digest: Digest, length: number }, options: WantOptions): Promise<ChunkReply> {
    this.stats.wants++
    return this.session(peer).want(chunk, options)
  }

  have (peer: PeerId, pack: Digest, options: { signal: AbortSignal }): Promise<ByteRange[]> {
    return this.session(peer).have(pack, options.signal)
  }

  /**
   * Tells the peer we joined these swarms and where we listen (fire and forget: a
   * lost JOIN only means the DHT finds us later). Its MEMBERS answers go to `onMembers`.
   */
  join (peer: PeerId, keys: readonly Digest[], addresses: readonly string[]): void {
    this.session(peer).join(keys, addresses)
  }

  /** Drops the session and the connection (used when a peer is banned). */
  async disconnect (peer: PeerId): Promise<void> {
    this.sessions.get(peer.toString())?.fail(new PeerUnavailableError(peer.toString(), 'disconnected by us'))
    await this.dialer.hangUp(peer)
  }

  /** Fails every request in progress and closes every stream. */
  close (): void {
    for (const session of this.sessions.values()) session.fail(new PeerUnavailableError(session.peer.toString(), 'chunk client closed'))
  }

  private session (peer: PeerId): Session {
    const key = peer.toString()
    let session = this.sessions.get(key)
    if (session === undefined) {
      session = new Session(peer, this.dialer, {
        dialTimeoutMs: this.dialTimeoutMs,
        window: this.window,
        stats: this.stats,
        onMembers: this.onMembers,
        // A session is single-use: when its stream ends it removes itself and the next want dials afresh.
        onEnd: () => { if (this.sessions.get(key) === session) this.sessions.delete(key) }
      })
      this.sessions.set(key, session)
    }
    return session
  }
}

interface Waiting {
  kind: 'chunk' | 'have'
  resolve: (message: ServerMessage) => void
  reject: (err: unknown) => void
  /** Whether the request has left the queue (a CANCEL is only worth sending then). */
  sent: boolean
}

class Session {
  readonly peer: PeerId
  private readonly dialer: Dialer
  private readonly dialTimeoutMs: number
  private readonly window: number
  private readonly stats: ChunkClientStats
  private readonly onEnd: () => void
  private readonly onMembers: MembersHandler
  private readonly waiting = new Map<number, Waiting>()
  private queue: WantItem[] = []
  /** Wants sent and not yet answered or cancelled. */
  private inFlight = 0
  private flushScheduled = false
  private nextId = 0
  private stream: Promise<Stream> | undefined
  private failure: Error | undefined

  constructor (peer: PeerId, dialer: Dialer, options: { dialTimeoutMs: number, window: number, stats: ChunkClientStats, onMembers: MembersHandler, onEnd: () => void }) {
    this.peer = peer
    this.onMembers = options.onMembers
    this.dialer = dialer
    this.dialTimeoutMs = options.dialTimeoutMs
    this.window = options.window
    this.stats = options.stats
    this.onEnd = options.onEnd
  }

  async want (chunk: { digest: Digest, length: number }, options: WantOptions): Promise<ChunkReply> {
    // Checked here, not when the batch is encoded: one bad item must not fail the whole session.
    if (!Number.isInteger(chunk.length) || chunk.length < 0 || chunk.length > MAX_CHUNK_BYTES) {
      throw new RangeError(`chunk ${chunk.digest} is ${chunk.length} bytes; peers exchange chunks of 0..${MAX_CHUNK_BYTES}`)
    }
    const item: WantItem = { id: this.allocateId(), digest: chunk.digest, length: chunk.length, fetch: options.fetch, waitMs: options.waitMs }
    const message = await this.request(item.id, 'chunk', options.signal, () => {
      this.queue.push(item)
      this.scheduleFlush()
    })
    if (message.type !== 'chunk') throw new ProtocolViolationError(`peer answered chunk request ${item.id} with ${message.type}`)
    if (message.status !== 'data') return { status: message.status }
    if (!message.zstd) return { status: 'data', bytes: ownBuffer(message.bytes) }
    try {
      // Capped at the length we asked for: a hostile frame cannot balloon memory.
      return { status: 'data', bytes: await zstdDecompressAsync(message.bytes, { maxOutputLength: Math.max(chunk.length, 1) }) }
    } catch (err) {
      throw new ProtocolViolationError(`peer sent chunk ${chunk.digest} as a zstd frame that does not decode to ${chunk.length} bytes or fewer: ${(err as Error).message}`)
    }
  }

  join (keys: readonly Digest[], addresses: readonly string[]): void {
    if (this.failure !== undefined) return
    for (let i = 0; i < keys.length; i += MAX_JOIN_KEYS) {
      const batch = keys.slice(i, i + MAX_JOIN_KEYS)
      void this.write(() => encodeJoin(batch, addresses))
    }
  }

  async have (pack: Digest, signal: AbortSignal): Promise<ByteRange[]> {
    const id = this.allocateId()
    const message = await this.request(id, 'have', signal, () => {
      this.waiting.get(id)!.sent = true
      void this.write(() => encodeHaveQuery(id, pack))
    })
    if (message.type !== 'have' || message.pack !== pack) throw new ProtocolViolationError(`peer answered availability request ${id} with something else`)
    return normalizeRanges(message.ranges)
  }

  /** Ends the session: every open request is rejected with `err`, the stream is reset. */
  fail (err: Error): void {
    if (this.failure !== undefined) return
    this.failure = err
    this.onEnd()
    for (const waiting of this.waiting.values()) waiting.reject(err)
    this.waiting.clear()
    this.queue = []
    void this.stream?.then(stream => stream.abort(err), () => {})
  }

  private allocateId (): number {
    this.nextId = (this.nextId + 1) >>> 0
    return this.nextId
  }

  /**
   * Registers a request and resolves with its answer. On abort the request is
   * forgotten and, if it already left, cancelled at the server, which then
   * stops working on it (a hedge that lost should not cost the peer upload).
   */
  private request (id: number, kind: Waiting['kind'], signal: AbortSignal, enqueue: () => void): Promise<ServerMessage> {
    if (this.failure !== undefined) return Promise.reject(this.failure)
    if (signal.aborted) return Promise.reject(signal.reason)
    return new Promise<ServerMessage>((resolve, reject) => {
      const onAbort = (): void => {
        const waiting = this.waiting.get(id)
        if (waiting === undefined) return
        this.waiting.delete(id)
        if (!waiting.sent) this.queue = this.queue.filter(queued => queued.id !== id)
        else {
          void this.write(() => encodeCancel(id))
          if (kind === 'chunk') this.answered()
        }
        reject(signal.reason)
      }
      const settle = <T>(fn: (value: T) => void) => (value: T): void => {
        signal.removeEventListener('abort', onAbort)
        fn(value)
      }
      this.waiting.set(id, { kind, resolve: settle(resolve), reject: settle(reject), sent: false })
      signal.addEventListener('abort', onAbort, { once: true })
      enqueue()
    })
  }

  /**
   * Wants from the same turn of the event loop go out together, up to
   * MAX_BATCH per frame and `window` unanswered per peer. The window keeps us
   * under the server's per-peer cap (which would answer busy) and bounds the
   * bytes a peer can have on their way to us.
   */
  private scheduleFlush (): void {
    if (this.flushScheduled) return
    this.flushScheduled = true
    setImmediate(() => {
      this.flushScheduled = false
      while (this.queue.length > 0 && this.inFlight < this.window) {
        const batch = this.queue.splice(0, Math.min(MAX_BATCH, this.window - this.inFlight))
        for (const item of batch) this.waiting.get(item.id)!.sent = true
        this.inFlight += batch.length
        this.stats.wantFrames++
        void this.write(() => encodeWant(batch))
      }
    })
  }

  /** A sent want was answered or cancelled: its window slot is free. */
  private answered (): void {
    this.inFlight--
    if (this.queue.length > 0) this.scheduleFlush()
  }

  /** Opens the stream on first use; `encode` runs only once it is open. */
  private async write (encode: () => Uint8Array): Promise<void> {
    try {
      const stream = await this.open()
      if (this.failure !== undefined) return
      if (!stream.send(encode())) await stream.onDrain({ signal: AbortSignal.timeout(this.dialTimeoutMs) })
    } catch (err) {
      this.fail(err instanceof PeerUnavailableError ? err : new PeerUnavailableError(this.peer.toString(), (err as Error).message, { cause: err }))
    }
  }

  private open (): Promise<Stream> {
    this.stream ??= (async () => {
      const stream = await this.dialer.dialProtocol(this.peer, CHUNK_PROTOCOL, { signal: AbortSignal.timeout(this.dialTimeoutMs) })
      this.stats.streams++
      void this.read(stream)
      return stream
    })()
    return this.stream
  }

  /**
   * Consumes every message as it arrives (messageStreamToDuplex never pauses
   * the stream), so yamux's 4 MiB read buffer never fills and resets the
   * stream (STACK.md #9); what a peer can have on its way to us is bounded by
   * the window instead: `window` chunks of at most MAX_CHUNK_BYTES.
   */
  private async read (stream: Stream): Promise<void> {
    try {
      await pipe(
        messageStreamToDuplex(stream).source,
        frameDecoder(MAX_SERVER_FRAME),
        async (frames: AsyncIterable<Uint8ArrayList>) => {
          for await (const frame of frames) this.deliver(decodeServerMessage(frame))
        }
      )
      this.fail(new PeerUnavailableError(this.peer.toString(), 'the chunk stream closed'))
    } catch (err) {
      if (err instanceof ProtocolViolationError) this.fail(err)
      else this.fail(new PeerUnavailableError(this.peer.toString(), (err as Error).message, { cause: err }))
    }
  }

  private deliver (message: ServerMessage): void {
    if (message.type === 'members') {
      this.onMembers(message.key, message.members, this.peer)
      return
    }
    const waiting = this.waiting.get(message.id)
    // An unknown id is an answer to something we cancelled: the race is legitimate, the bytes are dropped.
    if (waiting === undefined) return
    if ((message.type === 'chunk') !== (waiting.kind === 'chunk')) {
      throw new ProtocolViolationError(`peer sent ${message.type} for request ${message.id}, which asked for ${waiting.kind}`)
    }
    this.waiting.delete(message.id)
    if (waiting.kind === 'chunk') this.answered()
    waiting.resolve(message)
  }
}

/**
 * A chunk that arrived inside a larger receive buffer would keep that whole
 * buffer alive in the cache; copy it out when it does not own its buffer.
 */
function ownBuffer (bytes: Uint8Array): Uint8Array {
  return bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? bytes : bytes.slice()
}
