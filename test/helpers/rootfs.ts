/**
 * Reading a root filesystem tree on the host (an unpacked image, a mount) into the
 * same shape as the expectations in standard-layers.ts, so the two can be compared.
 */
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, readdir, readlink } from 'node:fs/promises'
import { join } from 'node:path'
import type { Stats } from 'node:fs'
import type { Digest } from '../../src/oci/digest.ts'

/** One path of a merged root filesystem view. */
export interface FsNode {
  type: 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo'
  /** Permission bits including setuid/setgid/sticky (mode & 0o7777). */
  mode: number
  uid: number
  gid: number
  /** Files: length and sha256 of the content. */
  size?: number
  sha256?: Digest
  /** Symlinks: the target, verbatim. */
  target?: string
  /** Devices. */
  major?: number
  minor?: number
  xattrs?: Record<string, Buffer>
  /** Paths with the same value are one inode (a hard link group); nlink = group size. */
  hardlinkGroup?: string
}

export type TreeNode = FsNode & { mtime: Date }

/**
 * Every path below ROOT (not ROOT itself), keyed `/a/b`, with content digests.
 * Node has no xattr API, so `xattrs` is left unset (see umoci.ts for unpacked
 * bundles); hard link groups are named after the inode.
 */
export async function readTree (root: string): Promise<Map<string, TreeNode>> {
  const tree = new Map<string, TreeNode>()
  const walk = async (dir: string, prefix: string): Promise<void> => {
    for (const name of (await readdir(dir)).sort()) {
      const hostPath = join(dir, name)
      const st = await lstat(hostPath)
      const node = await describe(hostPath, st)
      tree.set(`${prefix}/${name}`, node)
      if (node.type === 'dir') await walk(hostPath, `${prefix}/${name}`)
    }
  }
  await walk(root, '')
  return tree
}

async function describe (hostPath: string, st: Stats): Promise<TreeNode> {
  const base = { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime: st.mtime }
  const group = st.nlink > 1 && !st.isDirectory() ? { hardlinkGroup: `inode ${st.dev}:${st.ino}` } : {}
  if (st.isDirectory()) return { type: 'dir', ...base }
  if (st.isSymbolicLink()) return { type: 'symlink', ...base, target: await readlink(hostPath) }
  if (st.isFile()) return { type: 'file', ...base, size: st.size, sha256: await hashFile(hostPath), ...group }
  if (st.isFIFO()) return { type: 'fifo', ...base, ...group }
  if (st.isCharacterDevice() || st.isBlockDevice()) {
    // glibc's gnu_dev_major/minor: the 64-bit dev_t keeps 12+20 bits of each.
    const rdev = BigInt(st.rdev)
    const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn))
    const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn))
    return { type: st.isCharacterDevice() ? 'char' : 'block', ...base, major, minor, ...group }
  }
  throw new Error(`${hostPath}: sockets and other file types cannot appear in an image`)
}

async function hashFile (path: string): Promise<Digest> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer)
  return `sha256:${hash.digest('hex')}`
}

/**
 * The hard link groups of a view as sorted lists of paths, sorted: comparable between
 * an expectation (named groups) and a tree read from disk (inode-named groups).
 */
export function hardlinkGroups (view: ReadonlyMap<string, FsNode>): string[][] {
  const groups = new Map<string, string[]>()
  for (const [path, node] of view) {
    if (node.hardlinkGroup !== undefined) groups.set(node.hardlinkGroup, [...groups.get(node.hardlinkGroup) ?? [], path])
  }
  return [...groups.values()].map(paths => paths.sort()).sort((a, b) => a[0]!.localeCompare(b[0]!))
}

export { resolveInRoot } from '../../src/run/resolve-in-root.ts'
