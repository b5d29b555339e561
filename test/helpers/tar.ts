/**
 * A minimal tar (POSIX pax) writer for test layers.
 *
 * Why not tar-stream's pack: it encodes pax records from JS strings as UTF-8, so an
 * xattr value such as a `security.capability` blob (bytes >= 0x80) cannot be written
 * byte-exact, and it has no way to emit a pax header we build ourselves. Owning the
 * ~100 lines of encoding also lets hostile tests write headers exactly as given.
 * Header objects use tar-stream's field names so tests can think in one vocabulary.
 */
import type { Header } from 'tar-stream'

const BLOCK = 512

type EntryType = Header['type'] | 'pax-header' | 'pax-global-header' | 'gnu-long-path' | 'gnu-long-link-path'

/** A header as tar-stream spells it, plus pax records (values may be binary). */
export type TarHeader = Partial<Omit<Header, 'type' | 'pax'>> & { name: string, type?: EntryType, pax?: Record<string, string | Buffer> }

const TYPEFLAG: Record<EntryType, string> = {
  file: '0',
  link: '1',
  symlink: '2',
  'character-device': '3',
  'block-device': '4',
  directory: '5',
  fifo: '6',
  'contiguous-file': '7',
  'pax-header': 'x',
  'pax-global-header': 'g',
  'gnu-long-link-path': 'K',
  'gnu-long-path': 'L'
}

/** Largest value of an octal field of WIDTH bytes (one byte is the terminator). */
const octalMax = (width: number): number => 8 ** (width - 1) - 1

/**
 * Encodes one entry: a pax extended header when anything does not fit ustar (long or
 * non-ASCII names, big ids, xattrs), then the ustar header, then BODY padded to a block.
 * The ustar size field is `header.size` when given (hostile tests may lie), else the
 * body's length.
 */
export function encodeEntry (header: TarHeader, body: Buffer = Buffer.alloc(0)): Buffer {
  const size = header.size ?? body.length
  const pax: Record<string, string | Buffer> = { ...header.pax }
  // ustarHeader writes a placeholder into a field whose value pax carries.
  if (splitUstarName(header.name) === undefined) pax.path = header.name
  let linkname = header.linkname ?? ''
  if (!isAscii(linkname) || linkname.length > 100) { pax.linkpath = linkname; linkname = placeholder(linkname) }
  const uid = header.uid ?? 0
  const gid = header.gid ?? 0
  if (uid > octalMax(8)) pax.uid = String(uid)
  if (gid > octalMax(8)) pax.gid = String(gid)

  const parts: Buffer[] = []
  if (Object.keys(pax).length > 0) {
    const records = encodePaxRecords(pax)
    parts.push(ustarHeader({ name: placeholder(`PaxHeaders/${header.name}`), type: 'pax-header', size: records.length, mtime: header.mtime }), pad(records))
  }
  parts.push(ustarHeader({ ...header, linkname, size, uid: Math.min(uid, octalMax(8)), gid: Math.min(gid, octalMax(8)) }))
  parts.push(pad(body))
  return Buffer.concat(parts)
}

/** Two zero blocks end an archive. */
export const END_OF_ARCHIVE = Buffer.alloc(2 * BLOCK)

function ustarHeader (h: TarHeader): Buffer {
  const buf = Buffer.alloc(BLOCK)
  const [prefix, name] = splitUstarName(h.name) ?? ['', placeholder(h.name)]
  buf.write(name, 0, 100, 'utf8')
  writeOctal(buf, 100, 8, (h.mode ?? (h.type === 'directory' ? 0o755 : 0o644)) & 0o7777)
  writeOctal(buf, 108, 8, h.uid ?? 0)
  writeOctal(buf, 116, 8, h.gid ?? 0)
  writeOctal(buf, 124, 12, h.size ?? 0)
  writeOctal(buf, 136, 12, Math.floor((h.mtime ?? new Date(0)).getTime() / 1000))
  buf.write(TYPEFLAG[h.type ?? 'file'], 156, 1, 'latin1')
  buf.write(h.linkname ?? '', 157, 100, 'utf8')
  buf.write('ustar\x0000', 257, 8, 'latin1')
  buf.write(h.uname ?? '', 265, 32, 'utf8')
  buf.write(h.gname ?? '', 297, 32, 'utf8')
  writeOctal(buf, 329, 8, h.devmajor ?? 0)
  writeOctal(buf, 337, 8, h.devminor ?? 0)
  buf.write(prefix, 345, 155, 'utf8')
  // The checksum is computed with its own field read as eight spaces.
  buf.fill(0x20, 148, 156)
  let sum = 0
  for (const byte of buf) sum += byte
  buf.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1')
  return buf
}

function writeOctal (buf: Buffer, offset: number, width: number, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > octalMax(width)) {
    throw new RangeError(`tar header field at offset ${offset}: ${value} does not fit ${width - 1} octal digits`)
  }
  buf.write(value.toString(8).padStart(width - 1, '0') + '\0', offset, width, 'latin1')
}

/** [prefix, name] for a ustar header, or undefined when NAME needs a pax `path`. */
function splitUstarName (name: string): [string, string] | undefined {
  if (!isAscii(name)) return undefined
  if (name.length <= 100) return ['', name]
  // Split at a slash so that the prefix fits 155 bytes and the rest 100.
  for (let i = name.indexOf('/'); i >= 0; i = name.indexOf('/', i + 1)) {
    if (i <= 155 && name.length - i - 1 <= 100 && i < name.length - 1) return [name.slice(0, i), name.slice(i + 1)]
  }
  return undefined
}

function isAscii (value: string): boolean {
  return /^[\x00-\x7f]*$/.test(value)
}

/** What the ustar field holds when pax carries the real value: readable, ASCII, short. */
function placeholder (value: string): string {
  return value.replace(/[^\x20-\x7e]/g, '_').slice(-99)
}

/** pax records `"<len> <key>=<value>\n"`, where len counts the whole record in bytes. */
function encodePaxRecords (records: Record<string, string | Buffer>): Buffer {
  return Buffer.concat(Object.entries(records).map(([key, value]) => {
    const body = Buffer.concat([Buffer.from(` ${key}=`), Buffer.from(value), Buffer.from('\n')])
    let length = body.length + String(body.length).length
    if (String(length).length !== String(body.length).length) length = body.length + String(length).length
    return Buffer.concat([Buffer.from(String(length)), body])
  }))
}

function pad (data: Buffer): Buffer {
  const rest = data.length % BLOCK
  return rest === 0 ? data : Buffer.concat([data, Buffer.alloc(BLOCK - rest)])
}
