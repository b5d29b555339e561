import type { OciLayout, BlobWriter } from '../oci/layout.ts'
import type { CodecId } from '../format/codec.ts'
import type { ChunkRef } from '../format/catalog.ts'
import type { Digest } from '../oci/digest.ts'

/** Where a chunk's bytes already live, and who put them there. */
export interface KnownChunk extends ChunkRef {
  packSize: number
  /** 'existing': in an image that was in the destination before this conversion. */
  from: 'existing' | 'converted'
}

/**
 * Every chunk the destination holds, by digest: chunks already stored (in an earlier
 * layer or an image converted before) are referenced, not written again. This is
 * how images that share content share packs.
 */
export class ChunkIndex {
  private readonly chunks = new Map<Digest, KnownChunk>()
  get (digest: Digest): KnownChunk | undefined { return this.chunks.get(digest) }
  add (chunk: KnownChunk): void { if (!this.chunks.has(chunk.digest)) this.chunks.set(chunk.digest, chunk) }
}

/** A chunk placed in a pack that may still be open: `packKey` names the pack until it is sealed. */
export interface PlacedChunk extends Omit<ChunkRef, 'pack'> { packKey: string }

/** `created`: false when the destination already held a pack with these exact bytes. */
export interface SealedPack { key: string, digest: Digest, size: number, created: boolean, chunks: ChunkRef[] }

/**
 * Appends chunks to pack blobs of about `targetSize` bytes. A pack's digest is known
 * only when it is sealed, so until then its chunks carry a placeholder key.
 */
export class PackWriter {
  private readonly layout: OciLayout
  private readonly targetSize: number
  private writer: BlobWriter | undefined
  private key = ''
  private packs = 0
  private pending: PlacedChunk[] = []

  constructor (layout: OciLayout, options: { targetSize: number }) {
    this.layout = layout
    this.targetSize = options.targetSize
  }

  /** Stores an encoded chunk in the open pack; seals the pack (and returns it) once it is full. */
  async append (digest: Digest, length: number, codec: CodecId, bytes: Uint8Array): Promise<{ placed: PlacedChunk, sealed?: SealedPack }> {
    if (this.writer === undefined) {
      this.writer = await this.layout.createBlobWriter()
      this.key = `open-pack-${++this.packs}`
    }
    const placed: PlacedChunk = { digest, length, packKey: this.key, packOffset: this.writer.size, storedLength: bytes.length, codec }
    this.pending.push(placed)
    await this.writer.write(bytes)
    if (this.writer.size < this.targetSize) return { placed }
    return { placed, sealed: await this.seal() }
  }

  /** Closes the open pack, if any. */
  async seal (): Promise<SealedPack | undefined> {
    if (this.writer === undefined) return undefined
    const { digest, size, created } = await this.writer.commit()
    this.writer = undefined
    const chunks = this.pending.map(({ packKey: _, ...c }) => ({ ...c, pack: digest }))
    this.pending = []
    return { key: this.key, digest, size, created, chunks }
  }

  /** Drops the open pack, if any (its temp file); sealed packs are the caller's to remove. */
  async abort (): Promise<void> {
    await this.writer?.abort()
    this.writer = undefined
    this.pending = []
  }
}
