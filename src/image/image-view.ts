import type { KeyObject } from 'node:crypto'
import { Catalog } from '../format/catalog.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchCatalogFile } from './catalog-files.ts'
import { loadImage, type BlobFetcher, type LoadedImage } from './load-image.ts'
import { MergedView } from './merged-view.ts'

export interface ImageView {
  image: LoadedImage
  view: MergedView
  close: () => void
}

/**
 * Loads an image, fetches its verified catalogs into CATALOG_DIR, and opens the
 * merged view. `fetchBlob`, when given, fetches the metadata and catalogs.
 */
export async function openImageView (origin: Origin, ref: string, options: { trusted: KeyObject[] | 'skip', catalogDir: string, signal?: AbortSignal, fetchBlob?: BlobFetcher, expectName?: string, accept?: (image: LoadedImage) => Promise<void> }): Promise<ImageView> {
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const image = await loadImage(origin, ref, { trusted: options.trusted, ...so, ...(options.fetchBlob !== undefined ? { fetchBlob: options.fetchBlob } : {}), ...(options.expectName !== undefined ? { expectName: options.expectName } : {}) })
  // E.g. the rollback guard: refused before any catalog is fetched.
  await options.accept?.(image)
  // All layers at once: a mount waits for the slowest catalog, not for their sum. Catalogs are
  // fetched in the swarm of the image's metadata (its manifest digest), not of their layer: in a
  // burst that swarm has formed while the metadata came, and a new one formed too late to help.
  const opened = await Promise.allSettled(image.config.layers.map(async layer =>
    new Catalog(await fetchCatalogFile(origin, { ...layer.catalog, group: image.manifestDigest }, options.catalogDir, options.signal, options.fetchBlob))))
  const catalogs = opened.flatMap(r => r.status === 'fulfilled' ? [r.value] : [])
  const failed = opened.find(r => r.status === 'rejected')
  if (failed !== undefined) {
    for (const c of catalogs) c.close()
    throw failed.reason
  }
  return { image, view: new MergedView(catalogs), close: () => { for (const c of catalogs) c.close() } }
}
