/**
 * The per-layer catalog: a plain SQLite database, as CernVM-FS does it. One row per
 * inode, one per directory entry (the unique (parent, name) key is the sorted
 * directory index), one per chunk of file content. Readers query it in place.
 *
 * Inode numbers are local to the layer; 1 is the layer's root directory. Content is
 * chunked file-aligned: extent k of a file covers [offset, offset + chunk.length).
 */
export const CATALOG_APPLICATION_ID = 0x73686f61 // 'shoa'
export const CATALOG_FORMAT_VERSION = 1
export const ROOT_INO = 1

export const CATALOG_SCHEMA = `
CREATE TABLE meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE inodes (
  ino    INTEGER PRIMARY KEY,
  mode   INTEGER NOT NULL,           -- st_mode: file type bits and permission bits
  uid    INTEGER NOT NULL,
  gid    INTEGER NOT NULL,
  size   INTEGER NOT NULL,           -- bytes of content for regular files, target length for symlinks
  mtime  INTEGER NOT NULL,           -- milliseconds since the epoch
  nlink  INTEGER NOT NULL,           -- names in this layer (hard links share one inode)
  rdev   INTEGER NOT NULL DEFAULT 0, -- device number for character and block devices
  target TEXT,                       -- symlink target, stored verbatim, never resolved here
  opaque INTEGER NOT NULL DEFAULT 0, -- 1: this directory hides the same directory in lower layers
  implicit INTEGER NOT NULL DEFAULT 0 -- 1: a directory the layer has no member for (only its children): lower layers' attributes apply
);

CREATE TABLE entries (
  parent   INTEGER NOT NULL,
  name     TEXT NOT NULL,
  ino      INTEGER,                  -- NULL for a whiteout
  whiteout INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (parent, name)
) WITHOUT ROWID;

CREATE TABLE xattrs (
  ino   INTEGER NOT NULL,
  name  TEXT NOT NULL,
  value BLOB NOT NULL,
  PRIMARY KEY (ino, name)
) WITHOUT ROWID;

CREATE TABLE packs (
  id     INTEGER PRIMARY KEY,
  digest TEXT NOT NULL UNIQUE,       -- sha256:... of the whole pack blob
  size   INTEGER NOT NULL
);

CREATE TABLE chunks (
  id            INTEGER PRIMARY KEY,
  digest        BLOB NOT NULL UNIQUE, -- 32-byte SHA-256 of the uncompressed bytes
  length        INTEGER NOT NULL,     -- uncompressed length
  pack          INTEGER NOT NULL REFERENCES packs(id),
  pack_offset   INTEGER NOT NULL,
  stored_length INTEGER NOT NULL,     -- bytes in the pack
  codec         INTEGER NOT NULL      -- 0 none, 1 zstd
);

CREATE TABLE extents (
  ino    INTEGER NOT NULL,
  offset INTEGER NOT NULL,            -- offset of this chunk in the file
  chunk  INTEGER NOT NULL REFERENCES chunks(id),
  PRIMARY KEY (ino, offset)
) WITHOUT ROWID;
`
