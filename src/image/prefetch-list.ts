import { isReg, type ChunkRef } from '../format/catalog.ts'
import type { Digest } from '../oci/digest.ts'
import type { PrefetchEntry } from '../format/image-config.ts'
import type { MergedView } from './merged-view.ts'

/**
 * Collects the reads a run makes, per file in first-read order, with overlapping and
 * adjacent ranges merged: the image's prefetch list (`shoal trace`).
 */
export class ReadRecorder {
  private readonly files = new Map<string, Array<[number, number]>>()

  record = (path: string, offset: number, length: number): void => {
    let ranges = this.files.get(path)
    if (ranges === undefined) { ranges = []; this.files.set(path, ranges) }
    ranges.push([offset, offset + length])
  }

  entries (): PrefetchEntry[] {
    return [...this.files].map(([path, ranges]) => {
      const merged: Array<[number, number]> = []
      for (const [start, end] of [...ranges].sort((a, b) => a[0] - b[0])) {
        const last = merged[merged.length - 1]
        if (last !== undefined && start <= last[1]) last[1] = Math.max(last[1], end)
        else merged.push([start, end])
      }
      return { path, ranges: merged.map(([start, end]) => [start, end - start] as [number, number]) }
    })
  }
}

/** The chunks a prefetch list needs, each once, in list order. Unknown paths are skipped. */
export function prefetchChunks (view: MergedView, entries: readonly PrefetchEntry[]): ChunkRef[] {
  const seen = new Set<Digest>()
  const out: ChunkRef[] = []
  for (const entry of entries) {
    const node = view.resolve(entry.path)
    if (node === undefined || !isReg(node.inode.mode)) continue
    for (const extent of view.extents(node)) {
      const wanted = entry.ranges === undefined || entry.ranges.some(([offset, length]) => extent.fileOffset < offset + length && offset < extent.fileOffset + extent.length)
      if (wanted && !seen.has(extent.digest)) {
        seen.add(extent.digest)
        out.push(extent)
      }
    }
  }
  return out
}

/**
 * CHUNKS sorted by pack and offset: fetched at once, neighbours in a pack then become
 * one range request (the RangeReader merges reads that arrive together), where list
 * order (first-read order) scatters them over the packs.
 */
export function inPackOrder (chunks: readonly ChunkRef[]): ChunkRef[] {
  return [...chunks].sort((a, b) => a.pack < b.pack ? -1 : a.pack > b.pack ? 1 : a.packOffset - b.packOffset)
}
