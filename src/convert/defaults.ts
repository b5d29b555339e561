/**
 * The converter's chunking defaults, apart from convert.ts so that the CLI can show them
 * in `shoal convert --help` without loading the converter (tar, zstd, SQLite, registry).
 */
export const DEFAULT_CHUNK_SIZE = 1 << 20
export const DEFAULT_PACK_SIZE = 16 << 20
