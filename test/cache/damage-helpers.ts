import { execFile } from 'node:child_process'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { testChunks, testResolver, TestSource } from '../fetch/helpers.ts'
import { tempDir } from '../helpers/tmp.ts'
import { until } from '../origin/helpers.ts'

/** What the disk-cache damage tests share: the CLI, a flipped byte, a read through the resolver's pread path. */

const SHOAL = fileURLToPath(new URL('../../bin/shoal', import.meta.url))
const signal = new AbortController().signal

/** `shoal ARGS`: exit code and output (a failing exit is a result here, not an error). */
export async function shoal (args: string[]): Promise<{ code: number, stdout: string, stderr: string }> {
  return await new Promise((resolve, reject) => {
    execFile(SHOAL, args, { timeout: 60_000 }, (err, stdout, stderr) => {
      if (err !== null && typeof err.code !== 'number') reject(err)
      else resolve({ code: err === null ? 0 : err.code as number, stdout, stderr })
    })
  })
}

/** Damages one byte of PATH at offset AT. */
export async function flipBits (path: string, at: number): Promise<void> {
  const file = await open(path, 'r+')
  try {
    const byte = Buffer.alloc(1)
    await file.read(byte, 0, 1, at)
    byte[0] = byte[0]! ^ 0x5a
    await file.write(byte, 0, 1, at)
  } finally {
    await file.close()
  }
}

/** Reads CHUNK's bytes [OFFSET, OFFSET+LENGTH) through the resolver's pread path. */
export async function read (resolver: Awaited<ReturnType<typeof testResolver>>['resolver'], chunk: { ref: Parameters<typeof resolver.get>[0] }, offset: number, length: number): Promise<Buffer> {
  const target = Buffer.alloc(length)
  await resolver.read(chunk.ref, target, 0, offset, length, { signal })
  return target
}

/**
 * A state dir whose running cache (open files checked every 50 ms) holds four chunks of
 * CHUNKBYTES each, fetched through a resolver from ORIGIN and written; chunk 1 is the one
 * the tests damage.
 */
export async function cachedChunks (chunkBytes: number): Promise<{ state: string, dir: string, chunks: ReturnType<typeof testChunks>, victim: ReturnType<typeof testChunks>[number], disk: DiskCache, origin: TestSource, resolver: Awaited<ReturnType<typeof testResolver>>['resolver'] }> {
  const state = await tempDir()
  const dir = join(state, 'cache')
  const chunks = testChunks(4, chunkBytes)
  const disk = await DiskCache.open({ dir, maxBytes: 1 << 30, openFileCheckMs: 50 })
  const origin = new TestSource('origin', chunks)
  const { resolver } = await testResolver({ remote: [origin], disk })
  for (const c of chunks) await resolver.get(c.ref, { signal })
  await until(() => disk.stats.writes === chunks.length)
  return { state, dir, chunks, victim: chunks[1]!, disk, origin, resolver }
}
