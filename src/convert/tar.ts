import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import tarStream from 'tar-stream'

/**
 * tar-stream decodes every PAX value as UTF-8, which mangles binary extended
 * attributes such as security.capability (GNU tar and Go's archive/tar write them
 * raw as SCHILY.xattr.* records). We replace its PAX decoder with one that keeps
 * those values byte-exact as latin1 strings; `xattrsOf` turns them back into bytes.
 * The replacement is checked by the binary-xattr round-trip test.
 */
const require = createRequire(import.meta.url)
const headers = require(join(dirname(require.resolve('tar-stream')), 'headers.js')) as { decodePax: (buf: Buffer) => Record<string, string> }
const XATTR_PREFIX = 'SCHILY.xattr.'

headers.decodePax = function decodePax (buf: Buffer): Record<string, string> {
  const result: Record<string, string> = {}
  while (buf.length > 0) {
    const space = buf.indexOf(32)
    if (space <= 0) return result
    const len = parseInt(buf.subarray(0, space).toString('latin1'), 10)
    if (!Number.isSafeInteger(len) || len <= space || len > buf.length) return result
    const record = buf.subarray(space + 1, len - 1) // drop the trailing newline
    const eq = record.indexOf(61) // '='
    if (eq < 0) return result
    const key = record.subarray(0, eq).toString('utf8')
    result[key] = record.subarray(eq + 1).toString(key.startsWith(XATTR_PREFIX) ? 'latin1' : 'utf8')
    buf = buf.subarray(len)
  }
  return result
}

export type TarHeader = tarStream.Header

/** Extended attributes of an entry, byte-exact. */
export function xattrsOf (header: TarHeader): Map<string, Buffer> {
  const out = new Map<string, Buffer>()
  const pax = header.pax as Record<string, string> | undefined
  if (pax == null) return out
  for (const [key, value] of Object.entries(pax)) {
    if (key.startsWith(XATTR_PREFIX)) out.set(key.slice(XATTR_PREFIX.length), Buffer.from(value, 'latin1'))
  }
  return out
}

export { tarStream }
