import { lstat, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import type { Usage } from './types.ts'

/**
 * Disk usage of the tree at ROOT the way containerd's overlay snapshotter reports
 * it (continuity's fs.DiskUsage): allocated bytes (st_blocks × 512, so sparse files
 * count what they occupy) and distinct inodes, ROOT included. A hard-linked file
 * counts once. Symlinks are not followed. Checks SIGNAL between entries, since an
 * upper dir can hold millions of files.
 */
export async function diskUsage (root: string, options: { signal?: AbortSignal } = {}): Promise<Usage> {
  const seen = new Set<string>()
  let size = 0
  const pending = [root]
  while (pending.length > 0) {
    options.signal?.throwIfAborted()
    const path = pending.pop()!
    let stats
    try {
      stats = await lstat(path, { bigint: true })
    } catch (err) {
      // A running container deletes files while we walk its upper dir: they no longer count.
      if (path !== root && (err as NodeJS.ErrnoException).code === 'ENOENT') continue
      throw err
    }
    const inode = `${stats.dev}:${stats.ino}`
    if (!seen.has(inode)) {
      seen.add(inode)
      size += Number(stats.blocks) * 512
    }
    if (stats.isDirectory()) {
      const names = await readdir(path).catch((err: NodeJS.ErrnoException) => {
        if (path !== root && err.code === 'ENOENT') return []
        throw err
      })
      for (const name of names) pending.push(join(path, name))
    }
  }
  return { size, inodes: seen.size }
}
