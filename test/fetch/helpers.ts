import { join } from 'node:path'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { MemoryCache } from '../../src/cache/memory-cache.ts'
import type { ChunkSource } from '../../src/fetch/chunk-source.ts'
import { ChunkResolver, type ChunkResolverOptions } from '../../src/fetch/resolver.ts'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { bytes } from '../origin/helpers.ts'
import { tempDir } from '../helpers/tmp.ts'

/** A ChunkRef for DATA, as a catalog would describe it (the pack is never read by test sources). */
export function chunkRef (data: Uint8Array): ChunkRef {
  return { digest: sha256(data), length: data.length, pack: sha256(Buffer.from('pack')), packOffset: 0, storedLength: data.length, codec: 0 }
}

/** N chunks of distinct pseudo-random bytes. */
export function testChunks (n: number, size = 4096): Array<{ ref: ChunkRef, data: Buffer }> {
  return Array.from({ length: n }, (_, i) => {
    const data = Buffer.from(bytes(size, i + 1))
    return { ref: chunkRef(data), data }
  })
}

type Answer = (chunk: ChunkRef, signal: AbortSignal, call: number) => Promise<Uint8Array | undefined>

/**
 * A remote source over an in-memory table, which records what it was asked and
 * how many requests it had in flight at once. ANSWER replaces the table lookup,
 * to send bad bytes, fail, or never answer.
 */
export class TestSource implements ChunkSource {
  readonly name: string
  readonly table = new Map<Digest, Uint8Array>()
  calls = 0
  active = 0
  maxActive = 0
  readonly signals: AbortSignal[] = []
  answer: Answer

  constructor (name: string, chunks: Iterable<{ ref: ChunkRef, data: Uint8Array }> = [], answer?: Answer) {
    this.name = name
    for (const c of chunks) this.table.set(c.ref.digest, c.data)
    this.answer = answer ?? (async chunk => this.table.get(chunk.digest))
  }

  async get (chunk: ChunkRef, options: { signal: AbortSignal }): Promise<Uint8Array | undefined> {
    this.calls++
    this.signals.push(options.signal)
    this.active++
    this.maxActive = Math.max(this.maxActive, this.active)
    try {
      return await this.answer(chunk, options.signal, this.calls)
    } finally {
      this.active--
    }
  }
}

/** A promise that settles only when SIGNAL aborts: a source that never answers. */
export function never (signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }))
}

/** A resolver over a fresh disk cache in a temp dir; the memory cache is off unless given. */
export async function testResolver (options: Partial<Omit<ChunkResolverOptions, 'disk'>> & { remote: ChunkSource[], disk?: DiskCache }): Promise<{ resolver: ChunkResolver, disk: DiskCache }> {
  const disk = options.disk ?? await DiskCache.open({ dir: join(await tempDir(), 'cache'), maxBytes: 1 << 30 })
  const resolver = new ChunkResolver({ memory: new MemoryCache(0), retryDelayMs: 1, ...options, disk })
  return { resolver, disk }
}
