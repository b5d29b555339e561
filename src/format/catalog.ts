import Database from 'better-sqlite3'
import { FormatError } from '../errors.ts'
import { CATALOG_APPLICATION_ID, CATALOG_FORMAT_VERSION, ROOT_INO } from './catalog-schema.ts'
import { digestFromHex, digestToBytes, type Digest } from '../oci/digest.ts'

export const S_IFMT = 0o170000
export const S_IFDIR = 0o040000
export const S_IFREG = 0o100000
export const S_IFLNK = 0o120000
export const S_IFCHR = 0o020000
export const S_IFBLK = 0o060000
export const S_IFIFO = 0o010000

export const isDir = (mode: number): boolean => (mode & S_IFMT) === S_IFDIR
export const isReg = (mode: number): boolean => (mode & S_IFMT) === S_IFREG
export const isLnk = (mode: number): boolean => (mode & S_IFMT) === S_IFLNK

export interface Inode {
  ino: number
  mode: number
  uid: number
  gid: number
  size: number
  mtime: number
  nlink: number
  rdev: number
  target: string | null
  opaque: number
  implicit: number
}

export interface Entry { name: string, ino: number | null, whiteout: number }

/** What the catalog says a chunk is: enough to locate it in its pack and to verify it. */
export interface ChunkRef {
  digest: Digest
  length: number
  pack: Digest
  packOffset: number
  storedLength: number
  codec: number
}

export interface Extent extends ChunkRef { fileOffset: number }

interface ChildRow {
  name: string, whiteout: number, ino: number | null, i_ino: number | null, mode: number | null, uid: number | null, gid: number | null, size: number | null,
  mtime: number | null, nlink: number | null, rdev: number | null, target: string | null, opaque: number | null, implicit: number | null
}

/** A directory's entry with its inode (undefined for a whiteout, or an entry whose inode row is missing). */
export type ChildInode = Entry & { inode: Inode | undefined }

export const CATALOG_DEFAULTS = {
  /**
   * A preloaded catalog with at most this many entries answers every directory
   * listing from one query, made at its first listing: a query per directory cost
   * the cached-reads benchmark's cold `find` (934 directories) a quarter of its time
   * (docs/BENCHMARKS.md). Bounded because the rows kept in JS are several times their
   * size in SQLite.
   */
  listingsMaxEntries: 100_000
} as const

/** A ChildRow's columns, over `entries e LEFT JOIN inodes i`. */
const CHILD_COLUMNS = `e.name AS name, e.whiteout AS whiteout, e.ino AS ino, i.ino AS i_ino, i.mode AS mode, i.uid AS uid, i.gid AS gid, i.size AS size,
  i.mtime AS mtime, i.nlink AS nlink, i.rdev AS rdev, i.target AS target, i.opaque AS opaque, i.implicit AS implicit`

interface ExtentRow { offset: number, digest: Buffer, length: number, pack: string, pack_offset: number, stored_length: number, codec: number }

/**
 * Read-only access to one layer's catalog. Statements are prepared once; every
 * lookup is a primary-key probe, so this is cheap enough for FUSE's hot path.
 */
export class Catalog {
  readonly path: string
  readonly db: Database.Database
  /** Every directory's listing, once preload found the catalog small enough (see childInodes). */
  private listings: Map<number, ChildInode[]> | undefined
  private listAll = false
  private readonly stmts: {
    inode: Database.Statement<[number], Inode>
    entry: Database.Statement<[number, string], Entry>
    children: Database.Statement<[number], Entry>
    childInodes: Database.Statement<[number], ChildRow>
    allChildInodes: Database.Statement<[], ChildRow & { parent: number }>
    xattrs: Database.Statement<[number], { name: string, value: Buffer }>
    extents: Database.Statement<[number], ExtentRow>
    chunk: Database.Statement<[Buffer], Omit<ExtentRow, 'offset'>>
    packChunks: Database.Statement<[string], Omit<ExtentRow, 'offset'>>
  }

  constructor (path: string) {
    this.path = path
    try {
      this.db = new Database(path, { readonly: true, fileMustExist: true })
      const appId = this.db.pragma('application_id', { simple: true }) as number
      const version = this.db.pragma('user_version', { simple: true }) as number
      if (appId !== CATALOG_APPLICATION_ID) throw new FormatError(`${path} is not a shoal catalog`)
      if (version !== CATALOG_FORMAT_VERSION) throw new FormatError(`${path} is catalog format ${version}; this shoal reads ${CATALOG_FORMAT_VERSION}`)
      this.stmts = {
        inode: this.db.prepare('SELECT * FROM inodes WHERE ino = ?'),
        entry: this.db.prepare('SELECT name, ino, whiteout FROM entries WHERE parent = ? AND name = ?'),
        children: this.db.prepare('SELECT name, ino, whiteout FROM entries WHERE parent = ? ORDER BY name'),
        childInodes: this.db.prepare(`SELECT ${CHILD_COLUMNS} FROM entries e LEFT JOIN inodes i ON i.ino = e.ino WHERE e.parent = ? ORDER BY e.name`),
        allChildInodes: this.db.prepare(`SELECT e.parent AS parent, ${CHILD_COLUMNS} FROM entries e LEFT JOIN inodes i ON i.ino = e.ino ORDER BY e.parent, e.name`),
        xattrs: this.db.prepare('SELECT name, value FROM xattrs WHERE ino = ? ORDER BY name'),
        extents: this.db.prepare(`SELECT e.offset, c.digest, c.length, p.digest AS pack, c.pack_offset, c.stored_length, c.codec
          FROM extents e JOIN chunks c ON c.id = e.chunk JOIN packs p ON p.id = c.pack WHERE e.ino = ? ORDER BY e.offset`),
        chunk: this.db.prepare(`SELECT c.digest, c.length, p.digest AS pack, c.pack_offset, c.stored_length, c.codec
          FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.digest = ?`),
        packChunks: this.db.prepare(`SELECT c.digest, c.length, p.digest AS pack, c.pack_offset, c.stored_length, c.codec
          FROM chunks c JOIN packs p ON p.id = c.pack WHERE p.digest = ? ORDER BY c.pack_offset`)
      }
    } catch (err) {
      if (err instanceof FormatError) throw err
      throw new FormatError(`cannot open catalog ${path}: ${(err as Error).message}`, { cause: err })
    }
  }

  /**
   * Reads the whole catalog into this connection's page cache, if it is at most
   * MAXBYTES, and keeps it there: every later lookup, listing and extent query is
   * answered from memory, never from the disk. A mounted image's first `ls`, `find`
   * or container start otherwise pays a random read of the file for each B-tree page
   * it touches, one at a time on the event loop. A catalog is immutable once opened,
   * so the connection also keeps its shared lock (locking_mode = EXCLUSIVE on a
   * read-only connection): no lock calls and no re-read of the file header per query.
   * Returns the bytes read, or 0 when the catalog is larger than MAXBYTES.
   */
  preload (maxBytes: number): number {
    const pageSize = this.db.pragma('page_size', { simple: true }) as number
    const bytes = pageSize * (this.db.pragma('page_count', { simple: true }) as number)
    if (bytes > maxBytes) return 0
    this.db.pragma(`cache_size = -${Math.ceil(bytes / 1024) + 64}`)
    this.db.pragma('locking_mode = EXCLUSIVE')
    // One scan per B-tree the read path uses (each table, and the digest index of chunks).
    for (const sql of PRELOAD_SCANS) this.db.prepare(sql).get()
    this.listAll = (this.db.prepare('SELECT count(*) AS n FROM entries').get() as { n: number }).n <= CATALOG_DEFAULTS.listingsMaxEntries
    return bytes
  }

  root (): Inode { return this.inode(ROOT_INO)! }
  inode (ino: number): Inode | undefined { return this.stmts.inode.get(ino) }
  entry (parent: number, name: string): Entry | undefined { return this.stmts.entry.get(parent, name) }
  children (parent: number): Entry[] { return this.stmts.children.all(parent) }

  /**
   * The entries of directory PARENT with their inodes, by name, in one query (readdir
   * of a directory only this layer has: `find` lists every directory, and a query per
   * entry cost more than the listing). A preloaded catalog of at most
   * `listingsMaxEntries` entries answers every directory from one query over all of
   * them, made at the first call and kept.
   */
  childInodes (parent: number): readonly ChildInode[] {
    if (!this.listAll) return this.stmts.childInodes.all(parent).map(childInode)
    if (this.listings === undefined) {
      this.listings = new Map()
      for (const r of this.stmts.allChildInodes.all()) {
        let list = this.listings.get(r.parent)
        if (list === undefined) this.listings.set(r.parent, list = [])
        list.push(childInode(r))
      }
    }
    return this.listings.get(parent) ?? []
  }

  xattrs (ino: number): Map<string, Buffer> {
    return new Map(this.stmts.xattrs.all(ino).map(r => [r.name, r.value]))
  }

  extents (ino: number): Extent[] {
    return this.stmts.extents.all(ino).map(r => ({
      fileOffset: r.offset,
      digest: digestFromHex(r.digest),
      length: r.length,
      pack: r.pack as Digest,
      packOffset: r.pack_offset,
      storedLength: r.stored_length,
      codec: r.codec
    }))
  }

  /**
   * Every chunk with its pack, in no particular order (the converter's: by pack,
   * mostly; no caller needs more): one pass over the chunks table with raw rows and
   * the packs from a small map, without a sort or a join. The agent's chunk index
   * reads this at every mount of a node with peers: 22 ms against 52 ms cold, with
   * the sort and join, for the python image's 6,500 chunks.
   */
  *allChunks (): Generator<ChunkRef> {
    const packs = new Map(this.db.prepare('SELECT id, digest FROM packs').raw().all() as Array<[number, Digest]>)
    const rows = this.db.prepare('SELECT digest, length, pack, pack_offset, stored_length, codec FROM chunks').raw().iterate() as IterableIterator<[Buffer, number, number, number, number, number]>
    for (const [digest, length, pack, packOffset, storedLength, codec] of rows) {
      yield { digest: digestFromHex(digest), length, pack: packs.get(pack)!, packOffset, storedLength, codec }
    }
  }

  /** The chunk with DIGEST, if this layer has one (a unique-index probe). */
  chunk (digest: Digest): ChunkRef | undefined {
    const r = this.stmts.chunk.get(digestToBytes(digest))
    return r === undefined ? undefined : toChunkRef(r)
  }

  /** The chunks stored in PACK that this layer refers to, in pack order. */
  packChunks (pack: Digest): ChunkRef[] {
    return this.stmts.packChunks.all(pack).map(toChunkRef)
  }

  /** The largest inode number (the FUSE layer packs layer and inode into a 32-bit st_ino). */
  maxIno (): number {
    return (this.db.prepare('SELECT max(ino) AS m FROM inodes').get() as { m: number | null }).m ?? 0
  }

  packs (): Array<{ digest: Digest, size: number }> {
    return this.db.prepare('SELECT digest, size FROM packs ORDER BY id').all() as Array<{ digest: Digest, size: number }>
  }

  close (): void { this.db.close() }
}

/** Full scans that touch every page of every B-tree (sums of columns keep SQLite on the table, not a smaller index). */
const PRELOAD_SCANS = [
  'SELECT sum(size), sum(length(target)) FROM inodes',
  'SELECT sum(length(name)), sum(ino) FROM entries',
  'SELECT sum(length(value)) FROM xattrs',
  'SELECT sum(chunk) FROM extents',
  'SELECT sum(stored_length) FROM chunks',
  'SELECT count(digest) FROM chunks INDEXED BY sqlite_autoindex_chunks_1',
  'SELECT sum(size), sum(length(digest)) FROM packs'
]

function childInode (r: ChildRow): ChildInode {
  return {
    name: r.name,
    ino: r.ino,
    whiteout: r.whiteout,
    inode: r.i_ino === null ? undefined : { ino: r.i_ino, mode: r.mode!, uid: r.uid!, gid: r.gid!, size: r.size!, mtime: r.mtime!, nlink: r.nlink!, rdev: r.rdev!, target: r.target, opaque: r.opaque!, implicit: r.implicit! }
  }
}

function toChunkRef (r: Omit<ExtentRow, 'offset'>): ChunkRef {
  return { digest: digestFromHex(r.digest), length: r.length, pack: r.pack as Digest, packOffset: r.pack_offset, storedLength: r.stored_length, codec: r.codec }
}
