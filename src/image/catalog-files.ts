import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { CACHE_MODES } from '../cache/disk-cache.ts'
import { writeAtomic } from '../util/files.ts'
import { digestHex, type Digest } from '../oci/digest.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchVerified, type BlobFetcher } from './load-image.ts'

/** Catalog files this process has hashed already: each is checked once per process, not per mount. */
const checked = new Set<string>()
/** One fetch per catalog at a time (two images sharing a layer, mounted together). */
const fetching = new Map<string, Promise<string>>()

/**
 * Catalogs are SQLite files, so they must sit on disk to be queried. They are
 * fetched into DIR/<hex>.sqlite after their digest checked out, renamed into place
 * atomically, and a file found there is hashed again before this process first
 * uses it: the catalog is where chunk digests come from, so a damaged one must
 * never be trusted just because it is on disk.
 */
export async function fetchCatalogFile (origin: Origin, catalog: { digest: Digest, size: number, group?: Digest }, dir: string, signal?: AbortSignal, fetcher?: BlobFetcher): Promise<string> {
  const path = join(dir, `${digestHex(catalog.digest)}.sqlite`)
  let pending = fetching.get(path)
  if (pending === undefined) {
    pending = (async () => {
      if (checked.has(path) || await fileHasDigest(path, catalog.digest)) {
        checked.add(path)
        return path
      }
      await mkdir(dir, { recursive: true })
      // A fetcher (the agent's: cache, peers, then origin) verifies what it returns; the origin path is checked here.
      const data = fetcher !== undefined
        ? await fetcher({ ...catalog, group: catalog.group ?? catalog.digest }, signal)
        : await fetchVerified(origin, catalog.digest, 'catalog', { size: catalog.size, maxBytes: catalog.size, ...(signal !== undefined ? { signal } : {}) })
      // A catalog lists the image's names, owners and modes: its owner's alone, like the chunks.
      await writeAtomic(path, data, { mode: CACHE_MODES.file })
      checked.add(path)
      return path
    })().finally(() => fetching.delete(path))
    fetching.set(path, pending)
  }
  return await pending
}

/** Whether PATH exists and hashes to DIGEST; a file that does not is removed. */
export async function fileHasDigest (path: string, digest: Digest): Promise<boolean> {
  const hash = createHash('sha256')
  try {
    for await (const piece of createReadStream(path)) hash.update(piece as Buffer)
  } catch {
    return false
  }
  if (`sha256:${hash.digest('hex')}` === digest) return true
  await rm(path, { force: true })
  return false
}
