import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { Catalog, type ChunkRef } from '../format/catalog.ts'
import { Codec } from '../format/codec.ts'
import { fileHasDigest } from '../image/catalog-files.ts'
import type { Digest } from '../oci/digest.ts'
import type { ChunkLocator } from '../p2p/local-chunks.ts'
import { silentLogger, type Logger } from '../util/log.ts'

/** A blob as a chunk of itself: whole, uncompressed, verified by its own digest. */
export function wholeBlobChunk (blob: { digest: Digest, size: number }): ChunkRef {
  return { digest: blob.digest, length: blob.size, pack: blob.digest, packOffset: 0, storedLength: blob.size, codec: Codec.none }
}

const CATALOG_FILE = /^([0-9a-f]{64})\.sqlite$/
/** Catalog rows indexed per turn of the event loop. */
const ROWS_PER_TURN = 4096

/**
 * Every chunk a verified catalog of this node names, by digest: what the node may
 * serve to peers (ChunkLocator). Every catalog it ever fetched counts, mounted or
 * not, so a node keeps serving what it cached after its container is gone.
 *
 * In memory, built once per catalog as it is cached or opened: a peer's request is
 * one Map lookup, where it was one SQLite query per cached catalog (a node that had
 * cached 50 layers ran 50 queries per request, on the event loop its reads share).
 * The catalogs are read once and closed: the index holds no file handles.
 */
export class ChunkIndex implements ChunkLocator {
  private readonly dir: string
  private readonly log: Logger
  private readonly chunks = new Map<Digest, ChunkRef>()
  /** Per pack: its chunks (several catalogs may name one pack: converters reuse packs), sorted by offset when asked for. */
  private readonly packs = new Map<Digest, { chunks: ChunkRef[], digests: Set<Digest>, sorted: boolean }>()
  /**
   * Blobs served whole, like one chunk each (catalogs and image metadata: manifest,
   * signature, config), with their sizes: those this node holds, and those a
   * verified descriptor named for a mount in progress. Naming the wanted ones too
   * lets a burst share them (a parent asked for one fetches it instead of saying
   * dont-have until it has its own).
   */
  private readonly wholeBlobs = new Map<Digest, number>()
  private readonly catalogs = new Set<Digest>()
  /** Catalogs being indexed: a second caller waits for the first. */
  private readonly indexing = new Map<Digest, Promise<void>>()
  /** locateSoon calls waiting for a digest to be named. */
  private readonly waiters = new Map<Digest, Set<() => void>>()
  /** Scans run one at a time: two mounts finishing together must not index one file twice. */
  private scanning: Promise<void> = Promise.resolve()
  private closed = false

  /** DIR holds the catalog files, named by their digests (STATE/catalogs). */
  constructor (options: { catalogDir: string, log?: Logger }) {
    this.dir = options.catalogDir
    this.log = options.log ?? silentLogger
  }

  get stats (): { catalogs: number, chunks: number, wholeBlobs: number } {
    return { catalogs: this.catalogs.size, chunks: this.chunks.size, wholeBlobs: this.wholeBlobs.size }
  }

  locate (digest: Digest): ChunkRef | undefined {
    const size = this.wholeBlobs.get(digest)
    if (size !== undefined) return wholeBlobChunk({ digest, size })
    return this.chunks.get(digest)
  }

  /**
   * `locate`, waiting for a catalog being opened (or a whole blob being named) to name
   * DIGEST until `signal` aborts: the caller bounds the wait (the server by
   * SERVING_DEFAULTS.locateWaitMs). Resolves undefined when it never came.
   */
  async locateSoon (digest: Digest, signal: AbortSignal): Promise<ChunkRef | undefined> {
    const ref = this.locate(digest)
    if (ref !== undefined || signal.aborted || this.closed) return ref
    await new Promise<void>(resolve => {
      let waiting = this.waiters.get(digest)
      if (waiting === undefined) this.waiters.set(digest, waiting = new Set())
      const set = waiting
      const wake = (): void => {
        set.delete(wake)
        if (set.size === 0 && this.waiters.get(digest) === set) this.waiters.delete(digest)
        signal.removeEventListener('abort', wake)
        resolve()
      }
      set.add(wake)
      signal.addEventListener('abort', wake, { once: true })
    })
    return this.locate(digest)
  }

  /** The chunks of PACK, in pack order (one array per pack, kept: peers ask for availability every few seconds). */
  packChunks (pack: Digest): readonly ChunkRef[] {
    const size = this.wholeBlobs.get(pack)
    if (size !== undefined) return [wholeBlobChunk({ digest: pack, size })]
    const entry = this.packs.get(pack)
    if (entry === undefined) return []
    if (!entry.sorted) {
      entry.chunks.sort((a, b) => a.packOffset - b.packOffset)
      entry.sorted = true
    }
    return entry.chunks
  }

  /** Names a whole blob as servable: held, or being fetched by a mount whose verified descriptor named it. */
  addWholeBlob (blob: { digest: Digest, size: number }): void {
    if (this.closed) return
    this.wholeBlobs.set(blob.digest, blob.size)
    this.wake(blob.digest)
  }

  /**
   * Indexes an open catalog whose file checked out against DIGEST (a mount's, already
   * verified by fetchCatalogFile); resolves once all its chunks are located. A catalog
   * indexed before is skipped. CATALOG must not be used by anyone else until then
   * (its rows are read with an open statement, a few thousand per turn of the event
   * loop: a 100,000-chunk catalog took 0.5-1 s on a busy 2-core machine, which in one
   * piece would have stalled every peer this node serves).
   */
  async addCatalog (digest: Digest, catalog: Catalog, size: number): Promise<void> {
    if (this.closed || this.catalogs.has(digest)) return
    let running = this.indexing.get(digest)
    if (running === undefined) {
      running = this.read(digest, catalog, size).finally(() => this.indexing.delete(digest))
      this.indexing.set(digest, running)
    }
    await running
  }

  private async read (digest: Digest, catalog: Catalog, size: number): Promise<void> {
    let rows = 0
    for (const ref of catalog.allChunks()) {
      if (++rows % ROWS_PER_TURN === 0) {
        await new Promise(resolve => setImmediate(resolve))
        if (this.closed) return
      }
      if (!this.chunks.has(ref.digest)) this.chunks.set(ref.digest, ref)
      let pack = this.packs.get(ref.pack)
      if (pack === undefined) this.packs.set(ref.pack, pack = { chunks: [], digests: new Set(), sorted: true })
      if (pack.digests.has(ref.digest)) continue
      pack.digests.add(ref.digest)
      // Rows come mostly in pack order: a list stays marked sorted until one arrives out of order.
      if (pack.sorted && pack.chunks.length > 0 && pack.chunks[pack.chunks.length - 1]!.packOffset > ref.packOffset) pack.sorted = false
      pack.chunks.push(ref)
      if (this.waiters.size > 0) this.wake(ref.digest)
    }
    this.catalogs.add(digest)
    this.wholeBlobs.set(digest, size)
    this.wake(digest)
  }

  /**
   * Indexes the catalog files in the catalog dir not indexed yet (at start, and when
   * the snapshotter fetched one). Catalog files are written only after their digest
   * checked out, and each is hashed again here before it is trusted.
   */
  async scan (): Promise<void> {
    const next = this.scanning.then(async () => await this.scanOnce())
    this.scanning = next.catch(() => {})
    await next
  }

  private async scanOnce (): Promise<void> {
    const names = await readdir(this.dir).catch(() => [] as string[])
    for (const name of names) {
      const hex = CATALOG_FILE.exec(name)?.[1]
      if (hex === undefined || this.closed || this.catalogs.has(`sha256:${hex}`)) continue
      const running = this.indexing.get(`sha256:${hex}`)
      if (running !== undefined) {
        await running
        continue
      }
      const digest: Digest = `sha256:${hex}`
      const path = join(this.dir, name)
      if (!await fileHasDigest(path, digest)) {
        this.log.warn({ file: name }, 'removed a catalog file that does not match its digest')
        continue
      }
      let catalog: Catalog | undefined
      try {
        catalog = new Catalog(path)
        await this.addCatalog(digest, catalog, (await stat(path)).size)
      } catch (err) {
        this.log.warn({ file: name, err: (err as Error).message }, 'ignoring an unreadable catalog file')
      } finally {
        catalog?.close()
      }
    }
  }

  /** Stops indexing; whoever waits in locateSoon gets what is known. */
  async close (): Promise<void> {
    this.closed = true
    await this.scanning
    await Promise.allSettled(this.indexing.values())
    for (const digest of [...this.waiters.keys()]) this.wake(digest)
  }

  private wake (digest: Digest): void {
    const waiting = this.waiters.get(digest)
    if (waiting !== undefined) for (const wake of [...waiting]) wake()
  }
}
