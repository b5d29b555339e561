import assert from 'node:assert/strict'
import { chmod, mkdir, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { it } from 'node:test'
import { CACHE_MODES, DiskCache } from '../../src/cache/disk-cache.ts'
import { sha256, digestHex } from '../../src/oci/digest.ts'
import { tempDir } from '../helpers/tmp.ts'

/** Issue 15 item 5: cached chunks are image file contents; only the cache's owner may read them. */
it('a new cache is owner-only: dirs 0700, chunk files 0600', async () => {
  const dir = join(await tempDir(), 'cache')
  const cache = await DiskCache.open({ dir, maxBytes: 1 << 20, segmentChunkLimit: 0 })
  const data = Buffer.from('root:secret-hash:19000::::::\n')
  const digest = sha256(data)
  await cache.put(digest, data)
  await cache.close()
  const hex = digestHex(digest)
  for (const d of [dir, join(dir, 'tmp'), join(dir, 'chunks'), join(dir, 'chunks', hex.slice(0, 2)), join(dir, 'chunks', 'ff')]) {
    assert.equal((await stat(d)).mode & 0o777, CACHE_MODES.dir, d)
  }
  assert.equal((await stat(join(dir, 'chunks', hex.slice(0, 2), hex))).mode & 0o777, CACHE_MODES.file)
})

it('open tightens what an older version left readable to all', async () => {
  const dir = join(await tempDir(), 'cache')
  const data = Buffer.from('old chunk\n')
  const hex = digestHex(sha256(data))
  const file = join(dir, 'chunks', hex.slice(0, 2), hex)
  await mkdir(join(dir, 'chunks', hex.slice(0, 2)), { recursive: true })
  await mkdir(join(dir, 'tmp'))
  for (const d of [dir, join(dir, 'chunks'), join(dir, 'chunks', hex.slice(0, 2)), join(dir, 'tmp')]) await chmod(d, 0o755)
  await writeFile(file, data, { mode: 0o644 })
  await chmod(file, 0o644)
  const cache = await DiskCache.open({ dir, maxBytes: 1 << 20, segmentChunkLimit: 0 })
  await cache.close()
  assert.equal(cache.stats.chunks, 1, 'the old chunk is kept')
  for (const d of [dir, join(dir, 'chunks'), join(dir, 'chunks', hex.slice(0, 2)), join(dir, 'tmp')]) {
    assert.equal((await stat(d)).mode & 0o777, 0o700, d)
  }
  assert.equal((await stat(file)).mode & 0o777, 0o600)
})
