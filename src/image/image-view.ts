import type { KeyObject } from 'node:crypto'
import { Catalog } from '../format/catalog.ts'
import type { Origin } from '../origin/origin.ts'
import { fetchCatalogFile, type CatalogFetcher } from './catalog-files.ts'
import { loadImage, type LoadedImage } from './load-image.ts'
import { MergedView } from './merged-view.ts'

export interface ImageView {
  image: LoadedImage
  view: MergedView
  close: () => void
}

/** Loads an image, fetches its verified catalogs into CATALOG_DIR, and opens the merged view. */
export async function openImageView (origin: Origin, ref: string, options: { trusted: KeyObject[] | 'skip', catalogDir: string, signal?: AbortSignal, fetchCatalog?: CatalogFetcher }): Promise<ImageView> {
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const image = await loadImage(origin, ref, { trusted: options.trusted, ...so })
  const catalogs: Catalog[] = []
  try {
    for (const layer of image.config.layers) {
      catalogs.push(new Catalog(await fetchCatalogFile(origin, layer.catalog, options.catalogDir, options.signal, options.fetchCatalog)))
    }
  } catch (err) {
    for (const c of catalogs) c.close()
    throw err
  }
  return { image, view: new MergedView(catalogs), close: () => { for (const c of catalogs) c.close() } }
}
