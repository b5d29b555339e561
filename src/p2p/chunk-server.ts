import type { Connection, PeerId, Stream } from '@libp2p/interface'
import { messageStreamToDuplex } from '@libp2p/utils'
import { pipe } from 'it-pipe'
import type { Libp2p } from 'libp2p'
import type { Uint8ArrayList } from 'uint8arraylist'
import { Codec, encodeChunkAsync } from '../format/codec.ts'
import { sha256, type Digest } from '../format/digest.ts'
import {
  CHUNK_PROTOCOL, MAX_CLIENT_FRAME, MAX_MEMBERS, decodeClientMessage, encodeChunkReply, encodeHave, encodeMembers, frameDecoder,
  type ByteRange, type ChunkStatus, type ClientMessage, type WantItem
} from './chunk-protocol.ts'
import { ProtocolViolationError } from './errors.ts'
import type { SwarmMembers } from './swarm-members.ts'
import { TokenBucket } from './token-bucket.ts'

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

export interface ChunkServerOptions {
  local: LocalChunks
  /** Requests one peer may have in progress (parent waits included); beyond it, `busy`. Default 64. */
  maxConcurrentPerPeer?: number
  /**
   * Peers served holder requests (no fetch flag) at once; a request from one
   * more peer is `busy`, so a popular holder sheds requesters to their tree
   * parents instead of splitting its uplink among everybody. A peer already
   * being served is not refused (one requester pipelining many chunks is
   * cheap), and parent requests are not limited here: the tree bounds how
   * many children a node has. Default 8.
   */
  maxHolderPeers?: number
  /** Total upload rate; beyond it, `busy`. Default unlimited. */
  uploadBytesPerSecond?: number
  /** Longest a requester may make us hold a parent request (its waitMs is capped to this). Default 5000. */
  maxWaitMs?: number
  /** Where JOINs from peers are recorded (the agent's pack router reads it). Default: ignored. */
  members?: SwarmMembers
  /** Inbound chunk streams per connection. Clients use one; a few more tolerate reconnect races. Default 4. */
  maxStreamsPerConnection?: number
  now?: () => number
}

export interface ChunkServerStats {
  /** Chunk items received. */
  requests: number
  served: number
  /** Bytes sent as chunk data (compressed where they travelled compressed). */
  bytesServed: number
  dontHave: number
  busy: number
  pending: number
  /** Parent requests: a child asked us to fetch a chunk if we lack it. */
  parentRequests: number
  /** Held chunks that failed our own re-hash (disk corruption): answered dont-have. */
  localCorruption: number
  /** Streams reset because the peer broke the protocol. */
  violations: number
}

type Registrar = Pick<Libp2p, 'handle' | 'unhandle'>

interface StreamState {
  readonly stream: Stream
  readonly remote: PeerId
  readonly peer: string
  /** Items in progress by id, so CANCEL can abort them. */
  readonly items: Map<number, AbortController>
  /** Everything still to answer, so a half-closed stream is closed only when it is done. */
  readonly work: Set<Promise<void>>
}

/**
 * Serves `/shoal/chunks/1.0.0`. Every item is answered independently, as soon
 * as it is ready. Limits that protect this node answer `busy` at once instead
 * of queueing: a requester with alternatives should use them.
 */
export class ChunkServer {
  readonly stats: ChunkServerStats = {
    requests: 0, served: 0, bytesServed: 0, dontHave: 0, busy: 0, pending: 0, parentRequests: 0, localCorruption: 0, violations: 0
  }

  private readonly registrar: Registrar
  private readonly local: LocalChunks
  private readonly members: SwarmMembers | undefined
  private readonly maxConcurrentPerPeer: number
  private readonly maxHolderPeers: number
  private readonly maxWaitMs: number
  private readonly maxStreamsPerConnection: number
  private readonly bucket: TokenBucket
  private readonly active = new Map<string, number>()
  /** Holder requests in progress, by peer. */
  private readonly holderActive = new Map<string, number>()
  private readonly streams = new Set<Stream>()
  /** The stream each peer sent its JOIN on: where it hears about newcomers. */
  private readonly joined = new Map<string, StreamState>()
  private readonly stopping = new AbortController()

  constructor (registrar: Registrar, options: ChunkServerOptions) {
    this.registrar = registrar
    this.local = options.local
    this.members = options.members
    this.maxConcurrentPerPeer = options.maxConcurrentPerPeer ?? 64
    this.maxHolderPeers = options.maxHolderPeers ?? 8
    this.maxWaitMs = options.maxWaitMs ?? 5000
    this.maxStreamsPerConnection = options.maxStreamsPerConnection ?? 4
    this.bucket = new TokenBucket(options.uploadBytesPerSecond ?? Infinity, { now: options.now })
  }

  async start (): Promise<void> {
    await this.registrar.handle(CHUNK_PROTOCOL, (stream, connection) => this.serve(stream, connection), {
      maxInboundStreams: this.maxStreamsPerConnection
    })
  }

  /** Refuses new streams, resets open ones and abandons the work in progress. Not restartable. */
  async stop (): Promise<void> {
    const reason = new Error('chunk server stopped')
    this.stopping.abort(reason)
    await this.registrar.unhandle(CHUNK_PROTOCOL)
    for (const stream of this.streams) stream.abort(reason)
  }

  private async serve (stream: Stream, connection: Connection): Promise<void> {
    const state: StreamState = { stream, remote: connection.remotePeer, peer: connection.remotePeer.toString(), items: new Map(), work: new Set() }
    const abandon = (): void => { for (const controller of state.items.values()) controller.abort(new Error('chunk stream ended')) }
    // 'close' means both directions are done or the connection died: nobody is left to answer.
    stream.addEventListener('close', abandon, { once: true })
    this.streams.add(stream)
    try {
      await pipe(
        messageStreamToDuplex(stream).source,
        frameDecoder(MAX_CLIENT_FRAME),
        async (frames: AsyncIterable<Uint8ArrayList>) => {
          for await (const frame of frames) this.dispatch(state, decodeClientMessage(frame))
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
      stream.removeEventListener('close', abandon)
      this.streams.delete(stream)
      if (this.joined.get(state.peer) === state) this.joined.delete(state.peer)
    }
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
    this.joined.set(state.peer, state)
    const newcomer = [{ id: state.peer, addresses }]
    for (const key of keys) {
      const { answer, passOn } = this.members.exchange(key, state.remote, addresses)
      for (let i = 0; i < answer.length; i += MAX_MEMBERS) {
        void this.send(state.stream, encodeMembers(key, answer.slice(i, i + MAX_MEMBERS)), this.stopping.signal)
      }
      for (const id of passOn) {
        const other = this.joined.get(id)
        if (other !== undefined) void this.send(other.stream, encodeMembers(key, newcomer), this.stopping.signal)
      }
    }
  }

  private track (state: StreamState, work: Promise<void>): void {
    state.work.add(work)
    void work.finally(() => state.work.delete(work))
  }

  private async answer (state: StreamState, item: WantItem): Promise<void> {
    this.stats.requests++
    const active = this.active.get(state.peer) ?? 0
    const shed = !item.fetch && !this.holderActive.has(state.peer) && this.holderActive.size >= this.maxHolderPeers
    if (active >= this.maxConcurrentPerPeer || shed) {
      await this.reply(state, item.id, 'busy')
      return
    }
    this.active.set(state.peer, active + 1)
    if (!item.fetch) increment(this.holderActive, state.peer, 1)
    const controller = new AbortController()
    state.items.set(item.id, controller)
    const signal = AbortSignal.any([controller.signal, this.stopping.signal])
    try {
      const found = await this.lookup(item, state.peer, signal)
      if (signal.aborted) return // cancelled: the requester does not want an answer
      if (found === 'pending' || found === undefined) {
        await this.reply(state, item.id, found ?? 'dont-have')
        return
      }
      if (found.length !== item.length || sha256(found) !== item.digest) {
        // Never pass on bytes we cannot vouch for; the agent's cache will find out on its own read.
        this.stats.localCorruption++
        await this.reply(state, item.id, 'dont-have')
        return
      }
      // On libuv's thread pool, at a fast level: a chunk compressed once per upload, not stored.
      const wire = this.local.compressible?.(item.digest) === true ? await encodeChunkAsync(found, 'zstd', 1) : { codec: Codec.none, bytes: found }
      if (signal.aborted) return
      if (!this.bucket.tryTake(wire.bytes.length)) {
        await this.reply(state, item.id, 'busy')
        return
      }
      this.stats.served++
      this.stats.bytesServed += wire.bytes.length
      await this.reply(state, item.id, 'data', wire.bytes, signal, wire.codec === Codec.zstd)
    } catch {
      if (!signal.aborted) await this.reply(state, item.id, 'dont-have')
    } finally {
      if (!item.fetch) increment(this.holderActive, state.peer, -1)
      state.items.delete(item.id)
      increment(this.active, state.peer, -1)
    }
  }

  /** Bytes, undefined (not held), or 'pending' (a fetch for a child still running when the wait ran out). */
  private async lookup (item: WantItem, from: string, signal: AbortSignal): Promise<Uint8Array | undefined | 'pending'> {
    if (!item.fetch) return await this.local.get(item.digest, { signal, fetch: false, from })
    this.stats.parentRequests++
    const fetching = this.local.get(item.digest, { signal, fetch: true, from })
    const waitMs = Math.min(item.waitMs, this.maxWaitMs)
    let timer: NodeJS.Timeout | undefined
    const expired = new Promise<'pending'>(resolve => { timer = setTimeout(() => resolve('pending'), waitMs) })
    try {
      return await Promise.race([fetching, expired])
    } finally {
      clearTimeout(timer)
    }
  }

  private async answerHave (state: StreamState, id: number, pack: Digest): Promise<void> {
    const ranges = await this.local.held(pack).catch(() => [])
    await this.send(state.stream, encodeHave(id, pack, ranges), this.stopping.signal)
  }

  private async reply (state: StreamState, id: number, status: ChunkStatus, bytes?: Uint8Array, signal?: AbortSignal, zstd = false): Promise<void> {
    if (status === 'busy') this.stats.busy++
    else if (status === 'dont-have') this.stats.dontHave++
    else if (status === 'pending') this.stats.pending++
    await this.send(state.stream, encodeChunkReply(id, status, bytes, zstd), signal ?? this.stopping.signal)
  }

  /**
   * Holding the request's concurrency slot until the stream drains is what
   * bounds the bytes queued for a peer that reads slowly (or not at all).
   */
  private async send (stream: Stream, data: Uint8Array | Uint8ArrayList, signal: AbortSignal): Promise<void> {
    try {
      if (!stream.send(data)) await stream.onDrain({ signal })
    } catch {
      // The stream closed or was reset: the requester has gone or will time out.
    }
  }
}

/** Adds `by` to a per-peer count, dropping the entry at zero (the maps stay as small as the live requests). */
function increment (counts: Map<string, number>, peer: string, by: number): void {
  const n = (counts.get(peer) ?? 0) + by
  if (n <= 0) counts.delete(peer)
  else counts.set(peer, n)
}
