import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import tarStream from 'tar-stream'
import { FormatError } from '../errors.ts'

/**
 * tar-stream decodes every PAX value as UTF-8, which mangles binary extended
 * attributes such as security.capability (GNU tar and Go's archive/tar write them
 * raw as SCHILY.xattr.* records), and any file name that is not UTF-8. We replace
 * its PAX decoder with one that keeps xattr names and values byte-exact as latin1
 * strings (`xattrsOf` turns them back into a checked name and bytes), and that
 * keeps the raw bytes of `path` and `linkpath` beside their UTF-8 decoding
 * (`memberNames` checks them). Other consumers see the same strings as before.
 * The replacement is checked by the binary-xattr round-trip test and the
 * non-UTF-8 name tests.
 */
const require = createRequire(import.meta.url)
const headers = require(join(dirname(require.resolve('tar-stream')), 'headers.js')) as { decodePax: (buf: Buffer) => Record<string, string> }
const XATTR_PREFIX = 'SCHILY.xattr.'
const XATTR_PREFIX_BYTES = Buffer.from(XATTR_PREFIX)
/** Raw (latin1) values of the pax records `path` and `linkpath`; symbols survive tar-stream's merge of global and local records. */
const RAW_PATH = Symbol('shoal.pax.path.latin1')
const RAW_LINKPATH = Symbol('shoal.pax.linkpath.latin1')

headers.decodePax = function decodePax (buf: Buffer): Record<string, string> {
  const result: Record<string | symbol, string> = {}
  while (buf.length > 0) {
    const space = buf.indexOf(32)
    if (space <= 0) return result
    const len = parseInt(buf.subarray(0, space).toString('latin1'), 10)
    if (!Number.isSafeInteger(len) || len <= space || len > buf.length) return result
    const record = buf.subarray(space + 1, len - 1) // drop the trailing newline
    const eq = record.indexOf(61) // '='
    if (eq < 0) return result
    const rawKey = record.subarray(0, eq)
    const rawValue = record.subarray(eq + 1)
    if (rawKey.subarray(0, XATTR_PREFIX_BYTES.length).equals(XATTR_PREFIX_BYTES)) {
      result[rawKey.toString('latin1')] = rawValue.toString('latin1')
    } else {
      const key = rawKey.toString('utf8')
      result[key] = rawValue.toString('utf8')
      if (key === 'path') result[RAW_PATH] = rawValue.toString('latin1')
      if (key === 'linkpath') result[RAW_LINKPATH] = rawValue.toString('latin1')
    }
    buf = buf.subarray(len)
  }
  return result
}

export type TarHeader = tarStream.Header

const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** BYTES as UTF-8, or undefined if they are not valid UTF-8. */
function decodeUtf8 (bytes: Buffer): string | undefined {
  try { return strictUtf8.decode(bytes) } catch { return undefined }
}

/** A name for messages: printable ASCII as is, every other byte as \xNN. */
export function hexEscape (bytes: Buffer): string {
  let out = ''
  for (const b of bytes) out += b >= 0x20 && b < 0x7f && b !== 0x5c && b !== 0x22 ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, '0')}`
  return out
}

/** LATIN1 (one char per byte) decoded as UTF-8; DESCRIBE names the bad name (hex-escaped) for the error. */
function checkedName (latin1: string, describe: (escaped: string) => string): string {
  const bytes = Buffer.from(latin1, 'latin1')
  const text = decodeUtf8(bytes)
  if (text === undefined) {
    throw new FormatError(`${describe(`"${hexEscape(bytes)}"`)} is not valid UTF-8; shoal keeps names byte-exact or refuses them (catalogs store names as text, and FUSE passes them as UTF-8 strings), so it cannot convert this layer`)
  }
  return text
}

/**
 * The member name and link target of an entry read by `layerExtract`, decoded as
 * UTF-8. Names that are not UTF-8 are refused (FormatError, name hex-escaped):
 * decoding them leniently would turn `caf\xe9` and `caf\xff` into one name.
 */
export function memberNames (header: TarHeader): { name: string, linkname: string | undefined } {
  const pax = header.pax as Record<string | symbol, string> | null | undefined
  // tar-stream takes pax `path`/`linkpath` over the header's fields when they are non-empty.
  const rawName = pax?.path ? pax[RAW_PATH] ?? header.name : header.name
  const rawLink = pax?.linkpath ? pax[RAW_LINKPATH] ?? header.linkname : header.linkname
  const name = checkedName(rawName, n => `member name ${n}`)
  const linkname = rawLink == null ? undefined : checkedName(rawLink, t => `the link target ${t} of member "${name}"`)
  return { name, linkname }
}

/** Extended attributes of an entry, byte-exact; a name that is not UTF-8 is refused. MEMBER names the entry in that error. */
export function xattrsOf (header: TarHeader, member = header.name): Map<string, Buffer> {
  const out = new Map<string, Buffer>()
  const pax = header.pax as Record<string, string> | undefined
  if (pax == null) return out
  for (const [key, value] of Object.entries(pax)) {
    if (key.startsWith(XATTR_PREFIX)) out.set(checkedName(key.slice(XATTR_PREFIX.length), n => `xattr name ${n} of member "${member}"`), Buffer.from(value, 'latin1'))
  }
  return out
}

/** How a layer tar ended, when that is worth a note (see `layerExtract`). */
export interface TarEnding {
  /** Two zero blocks were read (the end-of-archive marker); 1 if only one, 0 if none. */
  endBlocks: number
  /** Bytes of padding the last member was owed when the stream ended (0 if none). */
  missingPadding: number
  /** Bytes after the end-of-archive blocks, which were not parsed. */
  trailingBytes: number
  /** Whether any of those bytes was not zero. */
  trailingData: boolean
}

/** The parts of tar-stream's Extract that `layerExtract` reads and adjusts. */
interface ExtractInternals {
  _buffer: { buffered: number, shifted: number, shift: (size: number) => Buffer | null }
  _stream: { header: { size: number } } | null
  _header: { type: string, size: number } | null
  _missing: number
  _longHeader: boolean
  _consumeHeader: () => boolean
  _applyLongHeaders: () => void
  _write: (data: Buffer, cb: (err?: Error | null) => void) => void
  _final: (cb: (err?: Error | null) => void) => void
}

const padding = (size: number): number => (512 - (size % 512)) % 512

/** Member types that carry no data, whatever their size field says (Go's isHeaderOnlyType). */
const HEADER_ONLY = new Set(['link', 'symlink', 'character-device', 'block-device', 'directory', 'fifo'])

/**
 * A tar-stream extractor for layer tars that ends where containerd's unpacker (Go's
 * archive/tar) ends, and reads names as raw bytes (see `memberNames`):
 * - the stream may end after a complete member, or inside or before the padding of
 *   the last member's data, without end-of-archive blocks (`umoci insert` 0.4.7
 *   writes layers so); tar-stream alone calls that "Unexpected end of data";
 * - after two zero blocks (the end-of-archive marker) nothing more is parsed: the
 *   rest is read (the caller hashes it) and counted, not taken as members;
 * - a stream that ends inside a header, a pax/GNU long-name record or a member's
 *   data still fails ("Unexpected end of data");
 * - links, symlinks, devices, fifos and directories carry no data even when their
 *   size field is not 0 (tar-stream skips data after all but directories, so a
 *   symlink with a size would swallow the members after it).
 * `ending()` tells how the archive ended, once the stream has finished.
 */
export function layerExtract (): { extract: ReturnType<typeof tarStream.extract>, ending: () => TarEnding } {
  // Names as raw bytes (one char per byte): `memberNames` decodes them strictly.
  const extract = tarStream.extract({ filenameEncoding: 'latin1' } as Parameters<typeof tarStream.extract>[0])
  const x = extract as unknown as ExtractInternals
  for (const field of ['_buffer', '_stream', '_header', '_missing', '_longHeader', '_consumeHeader', '_applyLongHeaders', '_write', '_final'] as const) {
    if (!(field in x)) throw new Error(`internal: tar-stream's extractor has no ${field}; src/convert/tar.ts must be updated for this tar-stream version`)
  }
  let zeroRun = 0
  let ended = false
  let missingPadding = 0
  let trailingBytes = 0
  let trailingData = false
  const discard = (data: Buffer): void => {
    trailingBytes += data.length
    if (!trailingData && data.some(b => b !== 0)) trailingData = true
  }

  const consumeHeader = x._consumeHeader
  x._consumeHeader = function (this: ExtractInternals): boolean {
    const before = this._buffer.shifted
    const result = consumeHeader.call(this)
    if (this._buffer.shifted !== before) {
      if (this._header !== null) {
        zeroRun = 0
      } else if (++zeroRun === 2) {
        ended = true
        const rest = this._buffer.shift(this._buffer.buffered)
        if (rest !== null) discard(Buffer.from(rest))
      }
    }
    return result
  }
  // Called once a member's header is final (pax and GNU records applied), before its data is counted.
  const applyLongHeaders = x._applyLongHeaders
  x._applyLongHeaders = function (this: ExtractInternals): void {
    applyLongHeaders.call(this)
    if (this._header !== null && HEADER_ONLY.has(this._header.type)) this._header.size = 0
  }
  const write = x._write
  x._write = function (this: ExtractInternals, data: Buffer, cb: (err?: Error | null) => void): void {
    if (ended) { discard(data); cb(null); return }
    write.call(this, data, cb)
  }
  const final = x._final
  x._final = function (this: ExtractInternals, cb: (err?: Error | null) => void): void {
    if (!ended && !this._longHeader) {
      // Padding still owed: counted after a member's data (or a long header) was taken whole,
      // or not yet, when the last member's data has been handed on but not yet read.
      const owed = this._stream === null ? this._missing : this._missing === 0 ? padding(this._stream.header.size) : 0
      // What is buffered then is (part of) that padding; more would be a cut header.
      if (owed > 0 && this._buffer.buffered <= owed) {
        missingPadding = owed - this._buffer.buffered
        this._buffer.shift(this._buffer.buffered)
        this._missing = 0
      }
    }
    final.call(this, cb)
  }
  return { extract, ending: () => ({ endBlocks: ended ? 2 : zeroRun, missingPadding, trailingBytes, trailingData }) }
}

/** Notes for a layer whose tar ends in a way containerd accepts but a strict reader would not. */
export function endingNotes (e: TarEnding): string[] {
  const notes: string[] = []
  const accepted = 'accepted, as containerd accepts it'
  if (e.missingPadding > 0) {
    notes.push(`the layer tar ends right after its last member's data, without padding it to 512 bytes (${e.missingPadding} bytes missing) and without end-of-archive blocks (as umoci insert 0.4.7 writes layers); ${accepted}`)
  } else if (e.endBlocks === 0) {
    notes.push(`the layer tar ends after its last member without end-of-archive blocks; ${accepted}`)
  } else if (e.endBlocks === 1) {
    notes.push(`the layer tar ends with one end-of-archive block instead of two; ${accepted}`)
  }
  if (e.trailingData) notes.push(`${e.trailingBytes} bytes after the end-of-archive blocks were not read as members (containerd ignores them too); the layer digest covers them`)
  return notes
}

export { tarStream }
