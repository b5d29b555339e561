import { crc32 } from 'node:zlib'

/**
 * The on-disk format of the disk cache's segments (see DiskCache): small chunks are
 * appended, back to back, to DIR/segments/NNNNNNNN.data, and each one gets a record
 * in NNNNNNNN.idx, the segment's presence map, written after its bytes:
 *
 *   0..32  SHA-256 of the chunk (its name)
 *   32..38 offset of its bytes in the data file (48-bit little-endian)
 *   38..42 length (uint32 LE)
 *   42..44 flags (uint16 LE): 1 = tombstone (the chunk was found bad: forget it)
 *   44..48 CRC-32 of bytes 0..44
 *
 * Records are fixed-size and self-checking, so a record torn or never written (a
 * crash between reserving its place and writing it) is skipped and the records
 * after it still count. A record promises nothing about the bytes: after a restart
 * every chunk is hashed on its first use anyway (docs/ARCHITECTURE.md, "Trust
 * boundary"), so bytes lost in a crash or damaged later are caught there.
 */

export const SEGMENT_RECORD_BYTES = 48
export const SEGMENT_TOMBSTONE = 1
export const SEGMENT_NAME_RE = /^([0-9]{8})\.(data|idx)$/

export interface SegmentRecord { hex: string, offset: number, length: number }

export function segmentFileName (id: number, kind: 'data' | 'idx'): string {
  return `${String(id).padStart(8, '0')}.${kind}`
}

export function encodeSegmentRecord (hex: string, offset: number, length: number, flags = 0): Buffer {
  const record = Buffer.alloc(SEGMENT_RECORD_BYTES)
  record.write(hex, 0, 32, 'hex')
  record.writeUIntLE(offset, 32, 6)
  record.writeUInt32LE(length, 38)
  record.writeUInt16LE(flags, 42)
  record.writeUInt32LE(crc32(record.subarray(0, 44)), 44)
  return record
}

/**
 * The live chunks of a segment from its index file's bytes, in the order they were
 * written: records that fail their CRC or point past DATA_SIZE are skipped, a later
 * record for a digest replaces an earlier one, and a tombstone removes it. Also
 * returns how many bytes of whole records the index holds (a torn tail is cut there).
 */
export function parseSegmentIndex (index: Uint8Array, dataSize: number): { live: Map<string, SegmentRecord>, records: number, wholeBytes: number } {
  const live = new Map<string, SegmentRecord>()
  const buf = Buffer.from(index.buffer, index.byteOffset, index.byteLength)
  const records = Math.floor(buf.length / SEGMENT_RECORD_BYTES)
  for (let i = 0; i < records; i++) {
    const r = buf.subarray(i * SEGMENT_RECORD_BYTES, (i + 1) * SEGMENT_RECORD_BYTES)
    if (crc32(r.subarray(0, 44)) !== r.readUInt32LE(44)) continue
    const hex = r.toString('hex', 0, 32)
    const offset = r.readUIntLE(32, 6)
    const length = r.readUInt32LE(38)
    if ((r.readUInt16LE(42) & SEGMENT_TOMBSTONE) !== 0) {
      if (live.get(hex)?.offset === offset) live.delete(hex)
      continue
    }
    if (length === 0 || offset + length > dataSize) continue
    live.delete(hex) // re-inserted: Map order is the order of the latest record
    live.set(hex, { hex, offset, length })
  }
  return { live, records, wholeBytes: records * SEGMENT_RECORD_BYTES }
}
