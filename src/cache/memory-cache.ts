import type { Digest } from '../oci/digest.ts'

export interface MemoryCacheStats {
  bytes: number
  chunks: number
  evictions: number
}

/**
 * A small LRU of verified chunks, bounded in bytes. It exists because FUSE reads
 * arrive in 128 KiB pieces: without it, each of the eight reads of a 1 MiB chunk
 * would read and hash the whole chunk from disk again.
 *
 * Only verified bytes go in, so nothing coming out is checked again. Callers
 * share the stored arrays and must not modify them.
 */
export class MemoryCache {
  readonly maxBytes: number
  readonly stats: MemoryCacheStats = { bytes: 0, chunks: 0, evictions: 0 }
  /** Map order is recency order: the first key is the least recently used. */
  private readonly entries = new Map<Digest, Uint8Array>()

  constructor (maxBytes = 64 * 1024 * 1024) {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new RangeError(`memory cache size must be a non-negative integer, got ${maxBytes}`)
    this.maxBytes = maxBytes
  }

  /** Whether DIGEST is cached, without counting as a use. */
  has (digest: Digest): boolean {
    return this.entries.has(digest)
  }

  get (digest: Digest): Uint8Array | undefined {
    const data = this.entries.get(digest)
    if (data !== undefined) {
      this.entries.delete(digest)
      this.entries.set(digest, data)
    }
    return data
  }

  set (digest: Digest, data: Uint8Array): void {
    if (data.length > this.maxBytes) return
    const old = this.entries.get(digest)
    if (old !== undefined) {
      this.entries.delete(digest)
      this.stats.bytes -= old.length
      this.stats.chunks--
    }
    this.entries.set(digest, data)
    this.stats.bytes += data.length
    this.stats.chunks++
    for (const [victim, bytes] of this.entries) {
      if (this.stats.bytes <= this.maxBytes) break
      this.entries.delete(victim)
      this.stats.bytes -= bytes.length
      this.stats.chunks--
      this.stats.evictions++
    }
  }
}
