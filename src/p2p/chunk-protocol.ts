import { digestFromHex, digestToBytes, type Digest } from '../oci/digest.ts'
import { ProtocolViolationError } from './errors.ts'
import { LengthPrefixedDecoder, Uint8ArrayList } from './libp2p.ts'

/**
 * The chunk exchange protocol, `/shoal/chunks/1.0.0`: wire format and limits.
 *
 * One long-lived stream per peer pair carries many requests; request ids
 * multiplex the answers, which come back in whatever order the server finishes
 * them. Every frame is a 4-byte big-endian length followed by that many bytes,
 * the first of which is the message type. Integers are big-endian.
 *
 * Client → server
 *   0x01 WANT        u8 count (1..64), then count × item:
 *                      u32 id, 32 B chunk digest (SHA-256), u32 length,
 *                      u8 flags (bit 0: FETCH — "you are my parent for this
 *                      chunk: fetch it if you lack it"), u16 waitMs (how long
 *                      the server may hold the request while that fetch runs)
 *   0x02 CANCEL      u32 id (the requester no longer needs it, e.g. a hedge won)
 *   0x03 HAVE?       u32 id, 32 B pack digest
 *   0x04 JOIN        u8 count (1..32), then count × 32 B swarm key: "I want
 *                      (and will hold) what is announced under these keys",
 *                      then u8 count (0..4) × address (u16 length, UTF-8
 *                      multiaddr) where the sender listens. The server
 *                      answers with MEMBERS for each key and passes the new
 *                      member on to a few members it knows (peer exchange), so
 *                      a burst's nodes learn each other in milliseconds, before
 *                      their DHT provider records are out.
 * Server → client
 *   0x81 CHUNK       u32 id, u8 status (0 data, 1 dont-have, 2 busy, 3 pending,
 *                      4 data compressed), then, for data, the chunk's bytes
 *                      (status 4: one zstd frame of them)
 *   0x83 MEMBERS     32 B swarm key, u8 count (0..32), then count × member:
 *                      u8 length + UTF-8 peer id, u8 count (0..4) × address
 *                      (u16 length, UTF-8 multiaddr). Unsolicited pushes too.
 *   0x82 HAVE        u32 id, 32 B pack digest, u32 count, then count ×
 *                      (LEB128 gap from the previous range's end, LEB128 length)
 *
 * Availability (HAVE) is a list of byte ranges of the pack's stored bytes: a
 * chunk is held if [packOffset, packOffset + storedLength) lies inside one.
 * Why ranges, not a bitfield by chunk index: a bitfield needs both sides to
 * agree on the pack's chunk list, which lives in a catalog the peer layer does
 * not have; offsets are in every ChunkRef already. And holdings are runs
 * (reads and prefetch go in pack order, a complete pack is one range), so the
 * message is usually a few bytes. A list of digests would be 32 B per chunk.
 *
 * Chunks travel zstd-compressed when the image stored them compressed (the
 * catalog says so, and compression saved >= 1/16): a burst moved 12.7 MB per
 * node between peers for 5.5 MB from the origin when they travelled raw. The
 * receiver decompresses with the output capped at the length it asked for,
 * then verifies the digest (over the uncompressed bytes) as always.
 *
 * Version 2.0.0 added status 4; agents of 1.0.0 and 2.0.0 do not exchange
 * chunks (each goes to the origin instead).
 */

export const CHUNK_PROTOCOL = '/shoal/chunks/2.0.0'

/** Most chunks in one WANT frame. */
export const MAX_BATCH = 64
/** Largest chunk we will send or accept (the format's chunks are 1 MiB by default). */
export const MAX_CHUNK_BYTES = 16 * 1024 * 1024
/** Most ranges in a HAVE frame; a peer holding a more fragmented pack sends the first ones. */
export const MAX_HAVE_RANGES = 65_536
/** waitMs is a u16. */
export const MAX_WAIT_MS = 0xffff

const WANT = 0x01
const CANCEL = 0x02
const HAVE_QUERY = 0x03
const JOIN = 0x04
const CHUNK = 0x81
const HAVE = 0x82
const MEMBERS = 0x83

/** Keys in one JOIN. */
export const MAX_JOIN_KEYS = 32
/** Members in one MEMBERS message (an answer to a JOIN may take several). */
export const MAX_MEMBERS = 32
/** Addresses per member (and in a JOIN). */
export const MAX_ADDRESSES = 4
/** Longest address accepted. */
export const MAX_ADDRESS_BYTES = 200

const WANT_ITEM_BYTES = 4 + 32 + 4 + 1 + 2
const FLAG_FETCH = 0x01
const PREFIX_BYTES = 4

/** Largest frame a server accepts: a full WANT batch (a full JOIN is smaller). Anything bigger is hostile. */
export const MAX_CLIENT_FRAME = 2 + MAX_BATCH * WANT_ITEM_BYTES
/** Largest frame a client accepts: a CHUNK with the largest chunk (a full HAVE is smaller). */
export const MAX_SERVER_FRAME = 1 + 4 + 1 + MAX_CHUNK_BYTES

export type ChunkStatus = 'data' | 'dont-have' | 'busy' | 'pending'
const STATUS_CODES: readonly ChunkStatus[] = ['data', 'dont-have', 'busy', 'pending']
/** The wire status of a data reply whose bytes are one zstd frame. */
const DATA_ZSTD = 4

export interface WantItem {
  id: number
  digest: Digest
  length: number
  /** Ask the server, as our parent in the chunk's tree, to fetch it if it lacks it. */
  fetch: boolean
  /** How long the server may hold the request for a fetch in progress. */
  waitMs: number
}

export interface ByteRange { offset: number, length: number }

export type ClientMessage =
  | { type: 'want', items: WantItem[] }
  | { type: 'cancel', id: number }
  | { type: 'have-query', id: number, pack: Digest }
  | { type: 'join', keys: Digest[], addresses: string[] }

export type ServerMessage =
  | { type: 'chunk', id: number, status: 'data', bytes: Uint8Array, zstd: boolean }
  | { type: 'chunk', id: number, status: Exclude<ChunkStatus, 'data'> }
  | { type: 'have', id: number, pack: Digest, ranges: ByteRange[] }
  | { type: 'members', key: Digest, members: SwarmMember[] }

/** A swarm member as peers pass it on: its peer id and where it listens. */
export interface SwarmMember { id: string, addresses: readonly string[] }

// --- encoding ---------------------------------------------------------------

function frame (body: Uint8Array): Uint8Array {
  const out = new Uint8Array(PREFIX_BYTES + body.length)
  new DataView(out.buffer).setUint32(0, body.length)
  out.set(body, PREFIX_BYTES)
  return out
}

function checkId (id: number): void {
  if (!Number.isInteger(id) || id < 0 || id > 0xffffffff) throw new RangeError(`request id ${id} is not a u32`)
}

export function encodeWant (items: readonly WantItem[]): Uint8Array {
  if (items.length < 1 || items.length > MAX_BATCH) throw new RangeError(`a WANT carries 1..${MAX_BATCH} items, not ${items.length}`)
  const body = new Uint8Array(2 + items.length * WANT_ITEM_BYTES)
  const view = new DataView(body.buffer)
  body[0] = WANT
  body[1] = items.length
  let at = 2
  for (const item of items) {
    checkId(item.id)
    if (!Number.isInteger(item.length) || item.length < 0 || item.length > MAX_CHUNK_BYTES) {
      throw new RangeError(`chunk ${item.digest} is ${item.length} bytes; peers exchange chunks of 0..${MAX_CHUNK_BYTES}`)
    }
    view.setUint32(at, item.id)
    body.set(digestToBytes(item.digest), at + 4)
    view.setUint32(at + 36, item.length)
    body[at + 40] = item.fetch ? FLAG_FETCH : 0
    view.setUint16(at + 41, Math.max(0, Math.min(MAX_WAIT_MS, Math.round(item.waitMs))))
    at += WANT_ITEM_BYTES
  }
  return frame(body)
}

export function encodeCancel (id: number): Uint8Array {
  checkId(id)
  const body = new Uint8Array(5)
  body[0] = CANCEL
  new DataView(body.buffer).setUint32(1, id)
  return frame(body)
}

export function encodeJoin (keys: readonly Digest[], addresses: readonly string[]): Uint8Array {
  if (keys.length < 1 || keys.length > MAX_JOIN_KEYS) throw new RangeError(`a JOIN carries 1..${MAX_JOIN_KEYS} keys, not ${keys.length}`)
  const parts: Uint8Array[] = [Uint8Array.of(JOIN, keys.length), ...keys.map(digestToBytes), ...encodeAddresses(addresses)]
  return frame(concat(parts))
}

/** Pushes or answers the members of a swarm this node knows (at most MAX_MEMBERS, extra ones dropped). */
export function encodeMembers (key: Digest, members: readonly SwarmMember[]): Uint8Array {
  const kept = members.filter(m => Buffer.byteLength(m.id) <= 255).slice(0, MAX_MEMBERS)
  const parts: Uint8Array[] = [Uint8Array.of(MEMBERS), digestToBytes(key), Uint8Array.of(kept.length)]
  for (const member of kept) {
    const id = Buffer.from(member.id)
    parts.push(Uint8Array.of(id.length), id, ...encodeAddresses(member.addresses))
  }
  return frame(concat(parts))
}

/** u8 count, then (u16 length, UTF-8) each; addresses over the limits are left out. */
function encodeAddresses (addresses: readonly string[]): Uint8Array[] {
  const kept = addresses.map(a => Buffer.from(a)).filter(a => a.length <= MAX_ADDRESS_BYTES).slice(0, MAX_ADDRESSES)
  const out: Uint8Array[] = [Uint8Array.of(kept.length)]
  for (const a of kept) out.push(Uint8Array.of(a.length >> 8, a.length & 0xff), a)
  return out
}

function concat (parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.length
  }
  return out
}

export function encodeHaveQuery (id: number, pack: Digest): Uint8Array {
  checkId(id)
  const body = new Uint8Array(37)
  body[0] = HAVE_QUERY
  new DataView(body.buffer).setUint32(1, id)
  body.set(digestToBytes(pack), 5)
  return frame(body)
}

/**
 * A CHUNK frame as a list, so a 16 MiB body is sent without copying it
 * behind its 10-byte header. `zstd`: the data bytes are a zstd frame.
 */
export function encodeChunkReply (id: number, status: ChunkStatus, bytes?: Uint8Array, zstd = false): Uint8ArrayList {
  checkId(id)
  const body = status === 'data' ? bytes : undefined
  if (status === 'data' && body === undefined) throw new RangeError('a data reply needs bytes')
  const head = new Uint8Array(PREFIX_BYTES + 6)
  const view = new DataView(head.buffer)
  view.setUint32(0, 6 + (body?.length ?? 0))
  head[4] = CHUNK
  view.setUint32(5, id)
  head[9] = status === 'data' && zstd ? DATA_ZSTD : STATUS_CODES.indexOf(status)
  return body === undefined ? new Uint8ArrayList(head) : new Uint8ArrayList(head, body)
}

export function encodeHave (id: number, pack: Digest, ranges: readonly ByteRange[]): Uint8Array {
  checkId(id)
  const kept = normalizeRanges(ranges).slice(0, MAX_HAVE_RANGES)
  const parts: number[] = []
  let end = 0
  for (const r of kept) {
    writeLeb128(parts, r.offset - end)
    writeLeb128(parts, r.length)
    end = r.offset + r.length
  }
  const body = new Uint8Array(41 + parts.length)
  const view = new DataView(body.buffer)
  body[0] = HAVE
  view.setUint32(1, id)
  body.set(digestToBytes(pack), 5)
  view.setUint32(37, kept.length)
  body.set(parts, 41)
  return frame(body)
}

/**
 * A copy of an encoded CHUNK or HAVE frame with another request id: the server
 * encodes a pack's availability once and answers every query for it with this.
 */
export function withRequestId (frame: Uint8Array, id: number): Uint8Array {
  checkId(id)
  const copy = frame.slice()
  new DataView(copy.buffer).setUint32(PREFIX_BYTES + 1, id)
  return copy
}

// --- decoding ---------------------------------------------------------------

/** Reads a frame's fields, turning every out-of-bounds read into a protocol violation. */
class Reader {
  private readonly bytes: Uint8Array
  private readonly view: DataView
  at = 0

  constructor (bytes: Uint8Array) {
    this.bytes = bytes
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  }

  get remaining (): number { return this.bytes.length - this.at }

  private need (n: number, what: string): void {
    if (this.remaining < n) throw new ProtocolViolationError(`frame ends inside ${what}`)
  }

  u8 (what: string): number { this.need(1, what); return this.bytes[this.at++]! }
  u16 (what: string): number { this.need(2, what); const v = this.view.getUint16(this.at); this.at += 2; return v }
  u32 (what: string): number { this.need(4, what); const v = this.view.getUint32(this.at); this.at += 4; return v }
  digest (what: string): Digest { this.need(32, what); const d = digestFromHex(this.bytes.subarray(this.at, this.at + 32)); this.at += 32; return d }
  utf8 (length: number, what: string): string {
    this.need(length, what)
    const text = Buffer.from(this.bytes.buffer, this.bytes.byteOffset + this.at, length).toString('utf8')
    this.at += length
    return text
  }

  addresses (what: string): string[] {
    const count = this.u8(`${what} address count`)
    if (count > MAX_ADDRESSES) throw new ProtocolViolationError(`${what} with ${count} addresses (limit ${MAX_ADDRESSES})`)
    const out: string[] = []
    for (let i = 0; i < count; i++) {
      const length = this.u16(`${what} address length`)
      if (length > MAX_ADDRESS_BYTES) throw new ProtocolViolationError(`${what} address of ${length} bytes (limit ${MAX_ADDRESS_BYTES})`)
      out.push(this.utf8(length, `${what} address`))
    }
    return out
  }

  rest (): Uint8Array { const r = this.bytes.subarray(this.at); this.at = this.bytes.length; return r }

  leb128 (what: string): number {
    let value = 0
    let scale = 1
    for (let i = 0; i < 8; i++) {
      const byte = this.u8(what)
      value += (byte & 0x7f) * scale
      if ((byte & 0x80) === 0) {
        if (value > Number.MAX_SAFE_INTEGER) break
        return value
      }
      scale *= 128
    }
    throw new ProtocolViolationError(`${what} is not a LEB128 integer below 2^53`)
  }

  end (what: string): void {
    if (this.remaining !== 0) throw new ProtocolViolationError(`${this.remaining} stray bytes after ${what}`)
  }
}

function contiguous (frame: Uint8Array | Uint8ArrayList): Uint8Array {
  return frame instanceof Uint8Array ? frame : frame.subarray()
}

/** A client frame's type, read without decoding it (the server holds HAVE? and JOIN to its sender's rate before it decodes them). */
export function clientMessageType (frame: Uint8Array | Uint8ArrayList): ClientMessage['type'] | undefined {
  const type = frame.byteLength > 0 ? (frame instanceof Uint8Array ? frame[0] : frame.get(0)) : undefined
  return type === WANT ? 'want' : type === CANCEL ? 'cancel' : type === HAVE_QUERY ? 'have-query' : type === JOIN ? 'join' : undefined
}

/** Decodes one frame body (without its length prefix) sent by a client. */
export function decodeClientMessage (frame: Uint8Array | Uint8ArrayList): ClientMessage {
  const r = new Reader(contiguous(frame))
  const type = r.u8('message type')
  switch (type) {
    case WANT: {
      const count = r.u8('WANT count')
      if (count < 1 || count > MAX_BATCH) throw new ProtocolViolationError(`WANT of ${count} items (allowed 1..${MAX_BATCH})`)
      const items: WantItem[] = []
      for (let i = 0; i < count; i++) {
        const id = r.u32('WANT id')
        const digest = r.digest('WANT digest')
        const length = r.u32('WANT length')
        if (length > MAX_CHUNK_BYTES) throw new ProtocolViolationError(`WANT for a ${length}-byte chunk (limit ${MAX_CHUNK_BYTES})`)
        const flags = r.u8('WANT flags')
        const waitMs = r.u16('WANT waitMs')
        items.push({ id, digest, length, fetch: (flags & FLAG_FETCH) !== 0, waitMs })
      }
      r.end('WANT')
      return { type: 'want', items }
    }
    case CANCEL: {
      const id = r.u32('CANCEL id')
      r.end('CANCEL')
      return { type: 'cancel', id }
    }
    case HAVE_QUERY: {
      const id = r.u32('HAVE? id')
      const pack = r.digest('HAVE? pack')
      r.end('HAVE?')
      return { type: 'have-query', id, pack }
    }
    case JOIN: {
      const count = r.u8('JOIN count')
      if (count < 1 || count > MAX_JOIN_KEYS) throw new ProtocolViolationError(`JOIN of ${count} keys (allowed 1..${MAX_JOIN_KEYS})`)
      const keys: Digest[] = []
      for (let i = 0; i < count; i++) keys.push(r.digest('JOIN key'))
      const addresses = r.addresses('JOIN')
      r.end('JOIN')
      return { type: 'join', keys, addresses }
    }
    default:
      throw new ProtocolViolationError(`unknown client message type 0x${type.toString(16)}`)
  }
}

/** Decodes one frame body (without its length prefix) sent by a server. */
export function decodeServerMessage (frame: Uint8Array | Uint8ArrayList): ServerMessage {
  const r = new Reader(contiguous(frame))
  const type = r.u8('message type')
  switch (type) {
    case CHUNK: {
      const id = r.u32('CHUNK id')
      const code = r.u8('CHUNK status')
      if (code === DATA_ZSTD) return { type: 'chunk', id, status: 'data', bytes: r.rest(), zstd: true }
      const status = STATUS_CODES[code]
      if (status === undefined) throw new ProtocolViolationError(`unknown CHUNK status ${code}`)
      if (status === 'data') return { type: 'chunk', id, status, bytes: r.rest(), zstd: false }
      r.end('CHUNK')
      return { type: 'chunk', id, status }
    }
    case HAVE: {
      const id = r.u32('HAVE id')
      const pack = r.digest('HAVE pack')
      const count = r.u32('HAVE count')
      if (count > MAX_HAVE_RANGES) throw new ProtocolViolationError(`HAVE with ${count} ranges (limit ${MAX_HAVE_RANGES})`)
      const ranges: ByteRange[] = []
      let end = 0
      for (let i = 0; i < count; i++) {
        const offset = end + r.leb128('HAVE gap')
        const length = r.leb128('HAVE length')
        end = offset + length
        if (end > Number.MAX_SAFE_INTEGER) throw new ProtocolViolationError('HAVE range beyond 2^53')
        ranges.push({ offset, length })
      }
      r.end('HAVE')
      return { type: 'have', id, pack, ranges }
    }
    case MEMBERS: {
      const key = r.digest('MEMBERS key')
      const count = r.u8('MEMBERS count')
      if (count > MAX_MEMBERS) throw new ProtocolViolationError(`MEMBERS with ${count} members (limit ${MAX_MEMBERS})`)
      const members: SwarmMember[] = []
      for (let i = 0; i < count; i++) {
        const id = r.utf8(r.u8('MEMBERS id length'), 'MEMBERS id')
        members.push({ id, addresses: r.addresses('MEMBERS') })
      }
      r.end('MEMBERS')
      return { type: 'members', key, members }
    }
    default:
      throw new ProtocolViolationError(`unknown server message type 0x${type.toString(16)}`)
  }
}

/**
 * An it-pipe transform from a stream's raw bytes to frame bodies. Frames over
 * `maxFrame` are refused as soon as their length prefix arrives, before any of
 * the body is buffered: a hostile peer cannot make us hold more than one frame.
 */
export function frameDecoder (maxFrame: number): (source: AsyncIterable<Uint8Array | Uint8ArrayList>) => AsyncGenerator<Uint8ArrayList> {
  return async function * (source) {
    const decoder = new LengthPrefixedDecoder({
      maxDataLength: maxFrame,
      // one partial frame plus one incoming message (a yamux frame is at most its window)
      maxBufferSize: 2 * maxFrame + 16 * 1024 * 1024,
      lengthDecoder: (data: Uint8ArrayList | Uint8Array) => {
        if (data.byteLength < PREFIX_BYTES) throw new RangeError('length prefix not complete yet')
        if (data instanceof Uint8Array) return new DataView(data.buffer, data.byteOffset).getUint32(0)
        // Byte by byte: Uint8ArrayList.getUint32 copies, once per frame (a flood of small frames spent most of its time here).
        return (data.get(0) * 0x1000000) + ((data.get(1) << 16) | (data.get(2) << 8) | data.get(3))
      },
      encodingLength: () => PREFIX_BYTES
    })
    for await (const bytes of source) {
      try {
        yield * decoder.decode(bytes)
      } catch (err) {
        if (err instanceof ProtocolViolationError) throw err
        throw new ProtocolViolationError(`bad frame (limit ${maxFrame} bytes): ${(err as Error).message}`)
      }
    }
  }
}

// --- ranges -----------------------------------------------------------------

/** Sorted, merged, without empty or invalid ranges. */
export function normalizeRanges (ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = ranges
    .filter(r => Number.isSafeInteger(r.offset) && Number.isSafeInteger(r.length) && r.offset >= 0 && r.length > 0)
    .map(r => ({ offset: r.offset, length: r.length }))
    .sort((x, y) => x.offset - y.offset)
  const out: ByteRange[] = []
  for (const r of sorted) {
    const last = out[out.length - 1]
    if (last !== undefined && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset)
    } else {
      out.push(r)
    }
  }
  return out
}

/** Whether sorted, merged `ranges` cover [offset, offset + length) entirely. */
export function rangesCover (ranges: readonly ByteRange[], offset: number, length: number): boolean {
  let lo = 0
  let hi = ranges.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >> 1
    const r = ranges[mid]!
    if (offset < r.offset) hi = mid - 1
    else if (offset >= r.offset + r.length) lo = mid + 1
    else return offset + length <= r.offset + r.length
  }
  return false
}

function writeLeb128 (out: number[], value: number): void {
  let v = value
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80)
    v = Math.floor(v / 0x80)
  }
  out.push(v)
}
