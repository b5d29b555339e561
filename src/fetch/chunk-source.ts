import { IntegrityError } from '../errors.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { decodeChunkAsync } from '../format/codec.ts'
import type { Digest } from '../oci/digest.ts'
import type { RangeReader } from '../origin/range-reader.ts'

/**
 * Somewhere chunk bytes can come from: memory, the disk cache, peers, the origin.
 * `get` resolves to the chunk's uncompressed bytes, or undefined when the source
 * does not have it; it rejects when the source failed. Sources need not verify:
 * the resolver checks length and SHA-256 of everything a source returns.
 */
export interface ChunkSource {
  readonly name: 'memory' | 'disk' | 'peers' | 'origin' | (string & {})
  get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined>
}

/**
 * The resolver's cache of verified chunks (DiskCache; the simulation model's
 * per-node store): a ChunkSource that also tells what it holds, what this
 * process has verified already, and reads a verified chunk's bytes in place.
 */
export interface ChunkCache extends ChunkSource {
  has (digest: Digest): boolean
  /** Written or hashed by this process: its reads need no hash (docs/ARCHITECTURE.md, "Trust boundary"). */
  isVerified (digest: Digest): boolean
  markVerified (digest: Digest): void
  /** LENGTH bytes of CHUNK from CHUNK_OFFSET into TARGET at TARGET_OFFSET, if that can be done without waiting; false if not. */
  tryReadSync (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number): boolean
  /** The same, waiting for the disk; false when the chunk is not there. */
  readInto (chunk: ChunkRef, target: Uint8Array, targetOffset: number, chunkOffset: number, length: number): Promise<boolean>
  /** Keeps verified bytes (never rejects: a failed write only costs a refetch). */
  put (digest: Digest, data: Uint8Array): Promise<void>
  remove (digest: Digest): Promise<void>
}

/**
 * Chunks straight from their pack blobs at the origin. Reads go through a
 * RangeReader, so the chunks a read and its readahead want, which the converter
 * laid next to each other, leave as one HTTP range request.
 */
export class OriginChunkSource implements ChunkSource {
  readonly name = 'origin'
  private readonly reader: RangeReader

  constructor (reader: RangeReader) {
    this.reader = reader
  }

  async get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array> {
    // A chunk that is its own pack is a whole blob (image metadata or a catalog, resolved like a chunk).
    if (chunk.pack === chunk.digest && chunk.packOffset === 0) return await this.reader.readBlob(chunk.pack, chunk.storedLength, { signal: options.signal })
    const stored = await this.reader.read(chunk.pack, chunk.packOffset, chunk.storedLength, { signal: options.signal })
    let data: Uint8Array
    try {
      data = await decodeChunkAsync(stored, chunk.codec, chunk.length)
    } catch (err) {
      // Bytes that do not even decode are as untrustworthy as bytes that hash wrong.
      throw new IntegrityError(`chunk ${chunk.digest} in pack ${chunk.pack}`, `stored bytes do not decode (${(err as Error).message})`)
    }
    // An uncompressed chunk is a view into the merged range: copy it, so caching
    // this chunk does not pin its neighbours' bytes in memory too.
    return data.byteLength === data.buffer.byteLength ? data : data.slice()
  }
}
