import Database from 'better-sqlite3'
import { posix } from 'node:path'
import { FormatError } from '../errors.ts'
import { CATALOG_APPLICATION_ID, CATALOG_FORMAT_VERSION, CATALOG_SCHEMA, ROOT_INO } from '../format/catalog-schema.ts'
import { S_IFDIR, S_IFMT, isDir } from '../format/catalog.ts'
import { digestToBytes, type Digest } from '../oci/digest.ts'

export interface InodeAttrs {
  mode: number // including file type bits
  uid: number
  gid: number
  mtime: number // ms
  size: number
  rdev?: number
  target?: string
  xattrs?: Map<string, Buffer>
}

/**
 * Normalizes a tar member name the way umoci (securejoin) does: relative to the
 * image root, `.` and `..` resolved lexically, and `..` never climbing above the
 * root. So `../../etc/passwd` and `/etc/passwd` both mean `etc/passwd`. The catalog
 * is a database, not a directory tree, so no name can make the converter write
 * anywhere; this only decides which image path an entry lands on.
 */
export function normalizeMemberPath (name: string): string {
  const cleaned = posix.normalize('/' + name.replaceAll('\0', ''))
  return cleaned.replace(/^\/+/, '').replace(/\/+$/, '')
}

const WHITEOUT_PREFIX = '.wh.'
const OPAQUE_MARKER = '.wh..wh..opq'

/**
 * Builds one layer's catalog from tar members in archive order. Later members
 * replace earlier ones at the same path (tar semantics), except that a directory
 * over a directory only updates its attributes and keeps its children.
 */
export class CatalogWriter {
  private readonly db: Database.Database
  private nextIno = ROOT_INO + 1
  private readonly dirs = new Map<string, number>([['', ROOT_INO]])
  private readonly chunkIds = new Map<string, number>()
  private readonly packIds = new Map<string, number>()
  private readonly warnings: string[] = []
  private readonly s: Record<string, Database.Statement>

  constructor (path: string, meta: Record<string, string>) {
    this.db = new Database(path)
    // Build-only settings: the file is moved into the blob store only when complete.
    this.db.pragma('journal_mode = OFF')
    this.db.pragma('synchronous = OFF')
    // Chunks name their pack before the pack row exists (its digest comes at seal time).
    this.db.pragma('foreign_keys = OFF')
    this.db.pragma(`application_id = ${CATALOG_APPLICATION_ID}`)
    this.db.pragma(`user_version = ${CATALOG_FORMAT_VERSION}`)
    this.db.exec(CATALOG_SCHEMA)
    this.s = {
      insertInode: this.db.prepare('INSERT INTO inodes (ino, mode, uid, gid, size, mtime, nlink, rdev, target) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)'),
      updateInode: this.db.prepare('UPDATE inodes SET mode = ?, uid = ?, gid = ?, mtime = ?, implicit = 0 WHERE ino = ?'),
      insertImplicitDir: this.db.prepare(`INSERT INTO inodes (ino, mode, uid, gid, size, mtime, nlink, implicit) VALUES (?, ${S_IFDIR | 0o755}, 0, 0, 0, 0, 1, 1)`),
      inode: this.db.prepare('SELECT mode, nlink FROM inodes WHERE ino = ?'),
      setOpaque: this.db.prepare('UPDATE inodes SET opaque = 1 WHERE ino = ?'),
      nlink: this.db.prepare('UPDATE inodes SET nlink = nlink + ? WHERE ino = ?'),
      deleteInode: this.db.prepare('DELETE FROM inodes WHERE ino = ?'),
      entry: this.db.prepare('SELECT ino, whiteout FROM entries WHERE parent = ? AND name = ?'),
      children: this.db.prepare('SELECT name, ino FROM entries WHERE parent = ?'),
      deleteChildren: this.db.prepare('DELETE FROM entries WHERE parent = ?'),
      insertEntry: this.db.prepare('INSERT INTO entries (parent, name, ino, whiteout) VALUES (?, ?, ?, ?)'),
      deleteEntry: this.db.prepare('DELETE FROM entries WHERE parent = ? AND name = ?'),
      insertXattr: this.db.prepare('INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?, ?, ?)'),
      deleteXattrs: this.db.prepare('DELETE FROM xattrs WHERE ino = ?'),
      deleteExtents: this.db.prepare('DELETE FROM extents WHERE ino = ?'),
      insertExtent: this.db.prepare('INSERT INTO extents (ino, offset, chunk) VALUES (?, ?, ?)'),
      insertChunk: this.db.prepare('INSERT INTO chunks (id, digest, length, pack, pack_offset, stored_length, codec) VALUES (?, ?, ?, ?, ?, ?, ?)'),
      insertPack: this.db.prepare('INSERT INTO packs (id, digest, size) VALUES (?, ?, ?)'),
      setMeta: this.db.prepare('INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)')
    }
    // The implicit root; a "./" member in the tar updates it.
    this.s.insertImplicitDir!.run(ROOT_INO)
    for (const [k, v] of Object.entries(meta)) this.s.setMeta!.run(k, v)
    this.db.exec('BEGIN')
  }

  get notes (): readonly string[] { return this.warnings }

  /** Records something the user should know about this layer (kept short: 50 notes). */
  note (message: string): void {
    if (this.warnings.length < 50) this.warnings.push(message)
  }

  /** Adds a member that is not a hard link; returns its inode number. */
  add (path: string, attrs: InodeAttrs): number | undefined {
    if (path === '') {
      if (!isDir(attrs.mode)) { this.note(`ignored a non-directory member for the image root (${attrs.mode.toString(8)})`); return undefined }
      this.updateAttrs(ROOT_INO, attrs)
      return ROOT_INO
    }
    const parentPath = posix.dirname(path) === '.' ? '' : posix.dirname(path)
    const name = posix.basename(path)
    const parent = this.ensureDir(parentPath)
    if (name === OPAQUE_MARKER) { this.s.setOpaque!.run(parent); return undefined }
    if (name.startsWith(WHITEOUT_PREFIX)) {
      const hidden = name.slice(WHITEOUT_PREFIX.length)
      this.unlink(parent, parentPath, hidden)
      this.s.insertEntry!.run(parent, hidden, null, 1)
      return undefined
    }
    const existing = this.s.entry!.get(parent, name) as { ino: number | null, whiteout: number } | undefined
    if (existing?.ino != null && isDir(attrs.mode) && this.isDirIno(existing.ino)) {
      this.updateAttrs(existing.ino, attrs)
      return existing.ino
    }
    if (existing !== undefined) this.unlink(parent, parentPath, name)
    const ino = this.nextIno++
    this.s.insertInode!.run(ino, attrs.mode, attrs.uid, attrs.gid, attrs.size, attrs.mtime, attrs.rdev ?? 0, attrs.target ?? null)
    this.s.insertEntry!.run(parent, name, ino, 0)
    for (const [k, v] of attrs.xattrs ?? []) this.s.insertXattr!.run(ino, k, v)
    if (isDir(attrs.mode)) this.dirs.set(path, ino)
    // A whiteout replaced by a directory in the same layer still hides what is below.
    if (existing?.whiteout === 1 && isDir(attrs.mode)) this.s.setOpaque!.run(ino)
    return ino
  }

  /** Adds a hard link to a member that appeared earlier in this layer. */
  link (path: string, targetPath: string): void {
    const target = this.resolve(targetPath)
    if (target === undefined) {
      throw new FormatError(`hard link "${path}" points to "${targetPath}", which does not appear earlier in the same layer; the layer is malformed`)
    }
    if (this.isDirIno(target)) throw new FormatError(`hard link "${path}" points to directory "${targetPath}"; hard links to directories are not allowed`)
    if (path === '') throw new FormatError(`hard link to "${targetPath}" has an empty name`)
    const parentPath = posix.dirname(path) === '.' ? '' : posix.dirname(path)
    const name = posix.basename(path)
    const parent = this.ensureDir(parentPath)
    const existing = this.s.entry!.get(parent, name) as { ino: number | null } | undefined
    if (existing?.ino === target) return
    if (existing !== undefined) this.unlink(parent, parentPath, name)
    this.s.insertEntry!.run(parent, name, target, 0)
    this.s.nlink!.run(1, target)
  }

  /**
   * Records one chunk of a file. `packKey` is the pack's digest, or a placeholder for
   * a pack still being written; `finish` maps placeholders to digests.
   */
  addExtent (ino: number, fileOffset: number, chunk: { digest: Digest, length: number, packKey: string, packOffset: number, storedLength: number, codec: number }): void {
    let id = this.chunkIds.get(chunk.digest)
    if (id === undefined) {
      let packId = this.packIds.get(chunk.packKey)
      if (packId === undefined) { packId = this.packIds.size + 1; this.packIds.set(chunk.packKey, packId) }
      id = this.chunkIds.size + 1
      this.chunkIds.set(chunk.digest, id)
      this.s.insertChunk!.run(id, digestToBytes(chunk.digest), chunk.length, packId, chunk.packOffset, chunk.storedLength, chunk.codec)
    }
    this.s.insertExtent!.run(ino, fileOffset, id)
  }

  /** Whether this layer's catalog already has a row for the chunk. */
  hasChunk (digest: Digest): boolean { return this.chunkIds.has(digest) }

  /** The pack keys this layer's chunks point into. */
  packKeys (): string[] { return [...this.packIds.keys()] }

  /**
   * Writes the packs table (digests are known only once packs are sealed) and
   * compacts the database into `finalPath` with VACUUM INTO: no free pages in the blob.
   */
  finish (packs: Map<string, { digest: Digest, size: number }>, finalPath: string): void {
    for (const [key, id] of this.packIds) {
      const pack = packs.get(key)
      if (pack === undefined) throw new Error(`internal: pack ${key} was never sealed`)
      this.s.insertPack!.run(id, pack.digest, pack.size)
    }
    this.db.exec('COMMIT')
    this.db.prepare('VACUUM INTO ?').run(finalPath)
    this.db.close()
  }

  close (): void {
    if (this.db.open) this.db.close()
  }

  /** Regular files and their total size, as the layer finally stands. */
  fileStats (): { files: number, contentBytes: number } {
    const row = this.db.prepare(`SELECT count(*) AS files, coalesce(sum(size), 0) AS bytes FROM inodes WHERE (mode & ${S_IFMT}) = ${0o100000}`).get() as { files: number, bytes: number }
    return { files: row.files, contentBytes: row.bytes }
  }

  private isDirIno (ino: number): boolean {
    const row = this.s.inode!.get(ino) as { mode: number } | undefined
    return row !== undefined && isDir(row.mode)
  }

  private updateAttrs (ino: number, attrs: InodeAttrs): void {
    this.s.updateInode!.run(attrs.mode, attrs.uid, attrs.gid, attrs.mtime, ino)
    this.s.deleteXattrs!.run(ino)
    for (const [k, v] of attrs.xattrs ?? []) this.s.insertXattr!.run(ino, k, v)
  }

  /** The inode at PATH in this layer, without creating anything. */
  private resolve (path: string): number | undefined {
    if (path === '') return ROOT_INO
    let ino = ROOT_INO
    for (const part of path.split('/')) {
      const e = this.s.entry!.get(ino, part) as { ino: number | null } | undefined
      if (e?.ino == null) return undefined
      ino = e.ino
    }
    return ino
  }

  /**
   * The directory at PATH, created where the archive has no member for it (yet),
   * marked implicit: the merged view then shows a lower layer's attributes for it,
   * as overlayfs and umoci do (0755 root-owned only if no layer has it). A
   * non-directory in the way is replaced, as tar would.
   */
  private ensureDir (path: string): number {
    const known = this.dirs.get(path)
    if (known !== undefined) return known
    // Iterative, not recursive: a member may be thousands of directories deep. Find the
    // deepest ancestor already known (the root is), then make or adopt each level below it.
    const slashes: number[] = []
    for (let i = path.indexOf('/'); i >= 0; i = path.indexOf('/', i + 1)) slashes.push(i)
    slashes.push(path.length)
    let level = slashes.length - 1
    let ino = ROOT_INO
    for (; level > 0; level--) {
      const found = this.dirs.get(path.slice(0, slashes[level - 1]))
      if (found !== undefined) { ino = found; break }
    }
    for (; level < slashes.length; level++) {
      const parentPath = level === 0 ? '' : path.slice(0, slashes[level - 1])
      const name = path.slice(level === 0 ? 0 : slashes[level - 1]! + 1, slashes[level])
      ino = this.ensureChildDir(ino, parentPath, name)
      this.dirs.set(path.slice(0, slashes[level]), ino)
    }
    return ino
  }

  /** The directory NAME in PARENT (at PARENT_PATH), made (implicit) if missing or not a directory. */
  private ensureChildDir (parent: number, parentPath: string, name: string): number {
    const existing = this.s.entry!.get(parent, name) as { ino: number | null, whiteout: number } | undefined
    if (existing?.ino != null && this.isDirIno(existing.ino)) return existing.ino
    if (existing !== undefined) this.unlink(parent, parentPath, name)
    const ino = this.nextIno++
    this.s.insertImplicitDir!.run(ino)
    this.s.insertEntry!.run(parent, name, ino, 0)
    if (existing?.whiteout === 1) this.s.setOpaque!.run(ino)
    return ino
  }

  /** Removes the name PARENT/NAME; a directory goes with everything below it (iteratively: trees may be deep). */
  private unlink (parent: number, parentPath: string, name: string): void {
    const e = this.s.entry!.get(parent, name) as { ino: number | null } | undefined
    if (e === undefined) return
    this.s.deleteEntry!.run(parent, name)
    if (e.ino === null) return
    // Depth first: every removed directory's children are unlinked before the next sibling.
    const work: Array<{ ino: number, path: string }> = [{ ino: e.ino, path: parentPath === '' ? name : `${parentPath}/${name}` }]
    while (work.length > 0) {
      const { ino, path } = work.pop()!
      if (this.isDirIno(ino)) {
        for (const child of this.s.children!.all(ino) as Array<{ name: string, ino: number | null }>) {
          if (child.ino !== null) work.push({ ino: child.ino, path: `${path}/${child.name}` })
        }
        this.s.deleteChildren!.run(ino)
        this.dirs.delete(path)
      }
      this.dropInode(ino)
    }
  }

  /** Removes one name's hold on INO: the inode goes with its last name. */
  private dropInode (ino: number): void {
    const row = this.s.inode!.get(ino) as { mode: number, nlink: number }
    if (row.nlink <= 1) {
      this.s.deleteInode!.run(ino)
      this.s.deleteXattrs!.run(ino)
      this.s.deleteExtents!.run(ino)
    } else {
      this.s.nlink!.run(-1, ino)
    }
  }
}
