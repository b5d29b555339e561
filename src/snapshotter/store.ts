/**
 * The snapshotter's durable metadata: one SQLite database (`<root>/metadata.db`)
 * with a row per snapshot. Every change is one transaction, so a crash leaves
 * either the old records or the new ones, never half of a commit or remove.
 *
 * A snapshot's directory is `<root>/snapshots/<id>`. Ids come from a persisted
 * counter and are never reused: the directory is made before its row is written,
 * and a crash in between leaves a directory that no row names, which Cleanup
 * removes; a later snapshot can never be handed such a leftover.
 *
 * All methods are synchronous (better-sqlite3) and validate inside their
 * transaction, so concurrent async callers cannot interleave a check and a write.
 */
import { chmodSync, closeSync, openSync } from 'node:fs'
import { CACHE_MODES } from '../cache/disk-cache.ts'
import Database from 'better-sqlite3'
import type { RemoteLayerState } from './remote-layers.ts'
import { SnapshotArgumentError, SnapshotExistsError, SnapshotNotFoundError, SnapshotStateError } from './errors.ts'
import { Kind, kindName, type SnapshotInfo, type Usage } from './types.ts'

/** Bumped when the schema changes incompatibly; an unknown version is refused rather than misread. */
const SCHEMA_VERSION = 1

const SCHEMA = `
CREATE TABLE IF NOT EXISTS snapshots (
  id         INTEGER PRIMARY KEY,
  name       TEXT    NOT NULL UNIQUE,
  kind       INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
  -- By id, so that committing (a rename) never touches the children.
  parent_id  INTEGER REFERENCES snapshots (id) ON DELETE RESTRICT,
  labels     TEXT    NOT NULL,
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  size       INTEGER NOT NULL DEFAULT 0,
  inodes     INTEGER NOT NULL DEFAULT 0,
  -- RemoteLayerState as JSON when a RemoteLayers implementation serves the snapshot.
  remote     TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots (parent_id);
CREATE TABLE IF NOT EXISTS id_sequence (next INTEGER NOT NULL);
INSERT INTO id_sequence (next) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM id_sequence);
`

/** A snapshot as stored: its info plus what only the snapshotter needs. */
export interface SnapshotRecord extends SnapshotInfo {
  id: number
  /** Committed snapshots: measured at commit (or reported by the remote layer). */
  usage: Usage
  remote?: RemoteLayerState
}

export interface NewSnapshot {
  id: number
  name: string
  kind: Kind
  parent: string
  labels: Record<string, string>
  usage?: Usage
  remote?: RemoteLayerState
}

interface Row {
  id: number
  name: string
  kind: number
  parent_id: number | null
  parent_name: string | null
  labels: string
  created_ms: number
  updated_ms: number
  size: number
  inodes: number
  remote: string | null
}

const SELECT = `SELECT s.*, p.name AS parent_name FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id`

export class MetaStore {
  private readonly db: Database.Database

  private constructor (db: Database.Database) {
    this.db = db
  }

  static open (path: string): MetaStore {
    ownerOnlyFiles(path)
    const db = new Database(path)
    try {
      // WAL + FULL: a transaction that returned is on disk, even after a power cut.
      db.pragma('journal_mode = WAL')
      db.pragma('synchronous = FULL')
      db.pragma('foreign_keys = ON')
      const version = db.pragma('user_version', { simple: true }) as number
      if (version !== 0 && version !== SCHEMA_VERSION) {
        throw new Error(`${path} has snapshot metadata schema version ${version}, this shoal understands ${SCHEMA_VERSION}; use a matching shoal or a new snapshotter root`)
      }
      db.exec(SCHEMA)
      db.pragma(`user_version = ${SCHEMA_VERSION}`)
    } catch (err) {
      db.close()
      throw err
    }
    return new MetaStore(db)
  }

  close (): void {
    if (this.db.open) this.db.close()
  }

  /** A fresh id for a snapshot directory, durably taken: no later call returns it again. */
  reserveId (): number {
    const row = this.db.prepare('UPDATE id_sequence SET next = next + 1 RETURNING next - 1 AS id').get() as { id: number }
    return row.id
  }

  get (name: string): SnapshotRecord | undefined {
    const row = this.db.prepare(`${SELECT} WHERE s.name = ?`).get(name) as Row | undefined
    return row === undefined ? undefined : toRecord(row)
  }

  require (name: string): SnapshotRecord {
    const record = this.get(name)
    if (record === undefined) throw new SnapshotNotFoundError(`snapshot "${name}" does not exist`)
    return record
  }

  /** A parent for a new snapshot: it must exist and be committed (containerd's storage rules). */
  requireParent (name: string): SnapshotRecord {
    const parent = this.get(name)
    if (parent === undefined) throw new SnapshotNotFoundError(`parent snapshot "${name}" does not exist`)
    if (parent.kind !== Kind.Committed) throw new SnapshotArgumentError(`parent snapshot "${name}" is ${kindName(parent.kind)}, not committed; only committed snapshots can be parents`)
    return parent
  }

  all (): SnapshotRecord[] {
    return (this.db.prepare(`${SELECT} ORDER BY s.id`).all() as Row[]).map(toRecord)
  }

  /** Ids of every recorded snapshot (their directories are not orphans). */
  ids (): Set<number> {
    return new Set((this.db.prepare('SELECT id FROM snapshots').pluck().all() as number[]))
  }

  /** The ids of `id` and its ancestors, nearest first: overlay's lowerdir order. */
  chain (id: number): number[] {
    return this.db.prepare(`
      WITH RECURSIVE chain (id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
        UNION ALL
        SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
      )
      SELECT id FROM chain ORDER BY depth`).pluck().all(id) as number[]
  }

  /** Records a new snapshot (active, view, or a remote layer's committed one) in directory `id`. */
  insert (snapshot: NewSnapshot): SnapshotRecord {
    return this.db.transaction(() => {
      if (this.get(snapshot.name) !== undefined) throw new SnapshotExistsError(`snapshot "${snapshot.name}" already exists`)
      const parent = snapshot.parent === '' ? undefined : this.requireParent(snapshot.parent)
      const now = Date.now()
      this.db.prepare(`INSERT INTO snapshots (id, name, kind, parent_id, labels, created_ms, updated_ms, size, inodes, remote)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`).run(
        snapshot.id, snapshot.name, snapshot.kind, parent?.id ?? null, labelsJson(snapshot.labels), now, now,
        snapshot.usage?.size ?? 0, snapshot.usage?.inodes ?? 0,
        snapshot.remote === undefined ? null : JSON.stringify(snapshot.remote))
      return this.require(snapshot.name)
    }).immediate()
  }

  /**
   * Turns active snapshot `key` (directory `id`) into committed snapshot `name` (same directory),
   * as containerd's storage does: new timestamps, the commit's labels replace the old ones.
   */
  commit (commit: { key: string, name: string, labels: Record<string, string>, usage: Usage, id: number }): SnapshotRecord {
    const { key, name, labels, usage } = commit
    return this.db.transaction(() => {
      if (this.get(name) !== undefined) throw new SnapshotExistsError(`cannot commit "${key}" as "${name}": a snapshot named "${name}" already exists`)
      const active = this.get(key)
      if (active === undefined) throw new SnapshotNotFoundError(`cannot commit "${key}": no such snapshot`)
      if (active.kind !== Kind.Active) throw new SnapshotStateError(`cannot commit "${key}": it is a ${kindName(active.kind)} snapshot, only active ones can be committed`)
      // The usage was measured on directory `id`; a key removed and prepared again meanwhile is another snapshot.
      if (active.id !== commit.id) throw new SnapshotStateError(`cannot commit "${key}": it was removed and prepared again while being committed`)
      const now = Date.now()
      this.db.prepare(`UPDATE snapshots SET name = ?, kind = ?, labels = ?, created_ms = ?, updated_ms = ?, size = ?, inodes = ?
        WHERE id = ?`).run(name, Kind.Committed, labelsJson(labels), now, now, usage.size, usage.inodes, active.id)
      return this.require(name)
    }).immediate()
  }

  /** Deletes the record of `name` and returns it; refused while other snapshots name it as their parent. */
  remove (name: string): SnapshotRecord {
    return this.db.transaction(() => {
      const record = this.require(name)
      const child = this.db.prepare('SELECT name FROM snapshots WHERE parent_id = ? LIMIT 1').pluck().get(record.id) as string | undefined
      if (child !== undefined) throw new SnapshotStateError(`cannot remove snapshot "${name}": snapshot "${child}" (and maybe others) is built on it; remove the children first`)
      this.db.prepare('DELETE FROM snapshots WHERE id = ?').run(record.id)
      return record
    }).immediate()
  }

  /**
   * Sets labels as containerd's storage.UpdateInfo does: no paths means all mutable
   * fields (the labels); "labels" replaces them all; "labels.KEY" sets one key from
   * `labels` (or removes it when `labels` has no value for it). Any other path is an
   * immutable field and refused.
   */
  updateLabels (name: string, labels: Record<string, string>, paths: string[]): SnapshotRecord {
    return this.db.transaction(() => {
      const record = this.require(name)
      // A Map: a label key is any string, "__proto__" included.
      let updated = new Map(Object.entries(paths.length === 0 ? labels : record.labels))
      for (const path of paths) {
        if (path.startsWith('labels.')) {
          const key = path.slice('labels.'.length)
          updated.set(key, Object.hasOwn(labels, key) ? labels[key]! : '')
        } else if (path === 'labels') {
          updated = new Map(Object.entries(labels))
        } else {
          throw new SnapshotArgumentError(`cannot update field "${path}" of snapshot "${name}": only labels can change`)
        }
      }
      this.db.prepare('UPDATE snapshots SET labels = ?, updated_ms = ? WHERE id = ?').run(labelsJson(Object.fromEntries(updated)), Date.now(), record.id)
      return this.require(name)
    }).immediate()
  }
}

/** Labels as stored: an empty value means "no such label", as in containerd's metadata. */
function labelsJson (labels: Record<string, string>): string {
  return JSON.stringify(Object.fromEntries(Object.entries(labels).filter(([, value]) => value !== '')))
}

function toRecord (row: Row): SnapshotRecord {
  const record: SnapshotRecord = {
    id: row.id,
    name: row.name,
    parent: row.parent_name ?? '',
    kind: row.kind as Kind,
    labels: JSON.parse(row.labels) as Record<string, string>,
    created: new Date(row.created_ms),
    updated: new Date(row.updated_ms),
    usage: { size: row.size, inodes: row.inodes }
  }
  if (row.remote !== null) record.remote = JSON.parse(row.remote) as RemoteLayerState
  return record
}

/**
 * The snapshots' records are the agent's alone, like the rest of its state dir: SQLite
 * creates a database 0644, and its -wal and -shm files take the database's mode. So the
 * file is made 0600 before SQLite opens it, and files an older agent left looser are
 * tightened.
 */
function ownerOnlyFiles (path: string): void {
  closeSync(openSync(path, 'a', CACHE_MODES.file))
  for (const file of [path, `${path}-wal`, `${path}-shm`]) {
    try { chmodSync(file, CACHE_MODES.file) } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    }
  }
}
