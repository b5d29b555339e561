import { promisify } from 'node:util'
import { zstdCompress, zstdDecompress, zstdDecompressSync, constants, type ZstdOptions } from 'node:zlib'
import { FormatError } from '../errors.ts'

/** How a chunk is stored in its pack. Numbers are part of the catalog format. */
export const Codec = { none: 0, zstd: 1 } as const
export type CodecId = typeof Codec[keyof typeof Codec]
export type Compression = 'zstd' | 'none'

export function parseCompression (value: string): Compression {
  if (value === 'zstd' || value === 'none') return value
  throw new FormatError(`unknown chunk compression "${value}": use zstd or none`)
}

const zstdCompressAsync = promisify(zstdCompress)
const zstdDecompressAsync = promisify(zstdDecompress)

/**
 * Stored chunks at least this big are decompressed on libuv's thread pool: a 1 MiB
 * chunk takes about a millisecond of zstd, and the chunks of one range request then
 * decode side by side instead of one after another on the event loop that answers
 * FUSE. Smaller ones decode inline, where a thread-pool round trip would cost more.
 */
export const ASYNC_DECODE_MIN_BYTES = 64 * 1024

/**
 * Encodes a chunk for a pack, on libuv's thread pool so compression overlaps with
 * parsing and hashing. Compression is kept only when it saves at least 1/16 of the
 * bytes: decompressing costs CPU on every cold read, so it must pay for itself.
 */
export async function encodeChunkAsync (data: Uint8Array, compression: Compression, level = 3): Promise<{ codec: CodecId, bytes: Uint8Array }> {
  if (compression === 'none' || data.length < 512) return { codec: Codec.none, bytes: data }
  // One output buffer for the whole chunk (the default 16 KiB costs a thread-pool round trip per
  // piece), and the input size pledged so zstd sizes its window to the chunk, not to 2 MiB: most
  // chunks are small files, and context set-up dominated their cost (2x slower overall without).
  const packed = await zstdCompressAsync(data, {
    chunkSize: Math.max(data.length, 65536),
    params: { [constants.ZSTD_c_compressionLevel]: level, [constants.ZSTD_c_contentSizeFlag]: 1 },
    pledgedSrcSize: data.length
  } as ZstdOptions)
  if (packed.length <= data.length - (data.length >> 4)) return { codec: Codec.zstd, bytes: packed }
  return { codec: Codec.none, bytes: data }
}

/** decodeChunk, on the thread pool for big chunks (ASYNC_DECODE_MIN_BYTES). */
export async function decodeChunkAsync (stored: Uint8Array, codec: number, expectedLength: number): Promise<Uint8Array> {
  if (codec !== Codec.zstd || stored.length < ASYNC_DECODE_MIN_BYTES) return decodeChunk(stored, codec, expectedLength)
  return await zstdDecompressAsync(stored, { maxOutputLength: Math.max(expectedLength, 1) })
}

/** Decodes stored bytes; the caller still verifies length and digest. */
export function decodeChunk (stored: Uint8Array, codec: number, expectedLength: number): Uint8Array {
  switch (codec) {
    case Codec.none: return stored
    case Codec.zstd:
      // Cap the output so a hostile frame cannot balloon memory.
      return zstdDecompressSync(stored, { maxOutputLength: Math.max(expectedLength, 1) })
    default: throw new FormatError(`unknown chunk codec ${codec}`)
  }
}
