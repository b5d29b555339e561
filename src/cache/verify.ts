import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, open, readdir, readFile, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { NotFoundError } from '../errors.ts'
import { Semaphore } from '../util/limit.ts'
import { parseSegmentIndex, SEGMENT_NAME_RE, segmentFileName, type SegmentRecord } from './segments.ts'

/**
 * `shoal cache verify`: hashes every chunk file of a disk cache and deletes those
 * whose SHA-256 is not their name (bit rot, a bad disk, someone with root
 * writing to the cache). The agent trusts what it has verified once
 * (docs/ARCHITECTURE.md, "Trust boundary"), so this is the way to check
 * everything again. Safe beside a running agent: it only reads and deletes
 * chunk files (never DIR/tmp), an agent takes a deleted file for a miss and
 * fetches the chunk again, and one that has the file open notices the deletion
 * within DISK_CACHE_DEFAULTS.openFileCheckMs.
 *
 * Segments (small chunks, see DiskCache): every live chunk of a segment is hashed,
 * and a segment holding a bad one is deleted whole (data and index), with its good
 * chunks: the agent sees a deleted segment as it sees a deleted chunk file, and
 * fetches again what it needs. Its bad chunks are reported as removed.
 */

export interface CacheVerifyProgress {
  /** Chunk files hashed so far, of `total`. */
  checked: number
  total: number
  bytes: number
  totalBytes: number
  bad: number
}

export interface CacheVerifyResult extends CacheVerifyProgress {
  /** Hex digests of the deleted chunks. */
  removed: string[]
}

export const CACHE_VERIFY_DEFAULTS = {
  /** Files hashed at once: enough to keep a disk busy, few enough to leave the agent its thread pool. */
  concurrency: 2
} as const

const CHUNK_NAME_RE = /^[0-9a-f]{64}$/

/** Verifies the cache in DIR (a state dir's `cache`); ON_PROGRESS is called after each file. */
export async function verifyCacheDir (dir: string, options: { signal?: AbortSignal, onProgress?: (p: CacheVerifyProgress) => void } = {}): Promise<CacheVerifyResult> {
  const chunksDir = join(dir, 'chunks')
  let prefixes: string[]
  try {
    prefixes = (await readdir(chunksDir)).sort()
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new NotFoundError(`${dir} holds no chunk cache (no chunks/ directory): give the agent's state directory with --state`)
    throw err
  }
  const files: Array<{ hex: string, path: string, size: number }> = []
  for (const prefix of prefixes) {
    options.signal?.throwIfAborted()
    let names: string[]
    try { names = await readdir(join(chunksDir, prefix)) } catch { continue } // not a directory: the agent deletes strays on start
    for (const name of names) {
      if (!CHUNK_NAME_RE.test(name)) continue
      const path = join(chunksDir, prefix, name)
      const st = await lstat(path).catch(() => undefined) // evicted meanwhile
      if (st?.isFile() === true) files.push({ hex: name, path, size: st.size })
    }
  }
  const segments = await listSegments(dir)
  const segmentChunks = segments.reduce((n, s) => n + s.live.length, 0)
  const segmentBytes = segments.reduce((n, s) => n + s.live.reduce((m, r) => m + r.length, 0), 0)
  const result: CacheVerifyResult = { checked: 0, total: files.length + segmentChunks, bytes: 0, totalBytes: files.reduce((n, f) => n + f.size, 0) + segmentBytes, bad: 0, removed: [] }
  for (const segment of segments) {
    options.signal?.throwIfAborted()
    const bad = await verifySegment(segment, result, options.onProgress)
    if (bad.length === 0) continue
    result.removed.push(...bad)
    for (const path of [segment.dataPath, segment.idxPath]) await unlink(path).catch((err: NodeJS.ErrnoException) => { if (err.code !== 'ENOENT') throw err })
  }
  const limit = new Semaphore(CACHE_VERIFY_DEFAULTS.concurrency)
  await Promise.all(files.map(file => limit.run(async () => {
    const actual = await hashFile(file.path, options.signal)
    result.checked++
    result.bytes += file.size
    // undefined: deleted meanwhile (the agent evicted it), nothing to judge.
    if (actual !== undefined && actual !== file.hex) {
      result.bad++
      result.removed.push(file.hex)
      await unlink(file.path).catch((err: NodeJS.ErrnoException) => { if (err.code !== 'ENOENT') throw err })
    }
    options.onProgress?.(result)
  }, options.signal)))
  return result
}

async function hashFile (path: string, signal: AbortSignal | undefined): Promise<string | undefined> {
  const hash = createHash('sha256')
  try {
    await pipeline(createReadStream(path), hash, ...(signal !== undefined ? [{ signal }] as const : []))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
  return hash.digest('hex')
}

interface SegmentToVerify { dataPath: string, idxPath: string, live: SegmentRecord[] }

/** The segments of the cache in DIR with their live chunks (as the agent would find them at start). */
async function listSegments (dir: string): Promise<SegmentToVerify[]> {
  const segmentsDir = join(dir, 'segments')
  let names: string[]
  try { names = await readdir(segmentsDir) } catch { return [] } // a cache from before segments
  const out: SegmentToVerify[] = []
  for (const name of names.sort()) {
    const m = SEGMENT_NAME_RE.exec(name)
    if (m === null || m[2] !== 'data') continue
    const id = Number(m[1])
    const dataPath = join(segmentsDir, segmentFileName(id, 'data'))
    const idxPath = join(segmentsDir, segmentFileName(id, 'idx'))
    try {
      const size = (await lstat(dataPath)).size
      out.push({ dataPath, idxPath, live: [...parseSegmentIndex(await readFile(idxPath), size).live.values()] })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err // evicted meanwhile, or no index: the agent deletes it on start
    }
  }
  return out
}

/** Hashes every live chunk of SEGMENT; returns the hex digests of the bad ones. */
async function verifySegment (segment: SegmentToVerify, result: CacheVerifyProgress, onProgress: ((p: CacheVerifyProgress) => void) | undefined): Promise<string[]> {
  const bad: string[] = []
  let file
  try {
    file = await open(segment.dataPath, 'r')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [] // evicted meanwhile
    throw err
  }
  try {
    for (const r of segment.live) {
      const data = Buffer.allocUnsafe(r.length)
      const { bytesRead } = await file.read(data, 0, r.length, r.offset)
      result.checked++
      result.bytes += r.length
      if (bytesRead !== r.length || createHash('sha256').update(data).digest('hex') !== r.hex) {
        result.bad++
        bad.push(r.hex)
      }
      onProgress?.(result)
    }
  } finally {
    await file.close()
  }
  return bad
}
