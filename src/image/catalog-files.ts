import { mkdir, rename, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { writeAtomic } from '../oci/layout.ts'
import { digestHex, type Digest } from '../format/digest.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchVerified } from './load-image.ts'

/**
 * Catalogs are SQLite files, so they must sit on disk to be queried. They are
 * fetched into DIR/<hex>.sqlite only after their digest checked out, and renamed
 * into place atomically, so a file that exists there is one that was verified.
 */
export async function fetchCatalogFile (origin: Origin, catalog: { digest: Digest, size: number }, dir: string, signal?: AbortSignal): Promise<string> {
  const path = join(dir, `${digestHex(catalog.digest)}.sqlite`)
  const existing = await stat(path).catch(() => undefined)
  if (existing?.size === catalog.size) return path
  await mkdir(dir, { recursive: true })
  const data = await fetchVerified(origin, catalog.digest, 'catalog', { size: catalog.size, maxBytes: catalog.size, ...(signal !== undefined ? { signal } : {}) })
  const tmp = `${path}.tmp-${process.pid}`
  await writeAtomic(tmp, data)
  await rename(tmp, path)
  return path
}
