import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, readdir, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { NotFoundError } from '../errors.ts'
import { Semaphore } from '../util/limit.ts'

/**
 * `shoal cache verify`: hashes every chunk file of a disk cache and deletes those
 * whose SHA-256 is not their name (bit rot, a bad disk, someone with root
 * writing to the cache). The agent trusts what it has verified once
 * (docs/ARCHITECTURE.md, "Trust boundary"), so this is the way to check
 * everything again. Safe beside a running agent: it only reads and deletes
 * chunk files (never DIR/tmp), an agent takes a deleted file for a miss and
 * fetches the chunk again, and one that has the file open notices the deletion
 * within DISK_CACHE_DEFAULTS.openFileCheckMs.
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
  const result: CacheVerifyResult = { checked: 0, total: files.length, bytes: 0, totalBytes: files.reduce((n, f) => n + f.size, 0), bad: 0, removed: [] }
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
