import { posix } from 'node:path'
import { isDir, S_IFCHR, type Catalog, type Extent, type Inode } from '../format/catalog.ts'

/** A file or directory as the merged image shows it. */
export interface MergedNode {
  /** The layer (index into the view's catalogs, bottom = 0) whose inode is shown. */
  layer: number
  ino: number
  inode: Inode
  /**
   * For directories: every layer's copy of this directory that shows through, top
   * first, down to and including the first opaque one. Readdir merges them.
   */
  dirs: Array<{ layer: number, ino: number }>
}

/**
 * The read-only union of an image's layers, as overlayfs would present them:
 * an upper entry hides lower ones with the same path, `.wh.` whiteouts delete, and
 * opaque directories hide everything below them. Only catalogs are consulted.
 */
export class MergedView {
  readonly catalogs: readonly Catalog[]
  /** Whiteouts and opaque markers shown as overlayfs reads them in a lower directory, not applied. */
  readonly overlayLower: boolean
  private readonly whiteout: Inode | undefined

  /**
   * With `overlayLower` (one layer only) the view is that layer as an overlayfs lower
   * directory: containerd stacks it with the image's other layers, so whiteouts are
   * 0/0 character devices and opaque directories carry `trusted.overlay.opaque=y`,
   * as in a layer containerd extracted itself.
   */
  constructor (catalogs: readonly Catalog[], options: { overlayLower?: boolean } = {}) {
    if (catalogs.length === 0) throw new Error('a merged view needs at least one layer')
    if (options.overlayLower === true && catalogs.length !== 1) throw new Error('an overlay lower view shows one layer')
    this.catalogs = catalogs
    this.overlayLower = options.overlayLower === true
    // One inode number past the catalog's for every whiteout: overlayfs reads only their type and rdev.
    if (this.overlayLower) this.whiteout = { ino: catalogs[0]!.maxIno() + 1, mode: S_IFCHR, uid: 0, gid: 0, size: 0, mtime: 0, nlink: 1, rdev: 0, target: null, opaque: 0, implicit: 0 }
  }

  root (): MergedNode {
    const top = this.catalogs.length - 1
    const dirs: MergedNode['dirs'] = []
    for (let layer = top; layer >= 0; layer--) {
      const root = this.catalogs[layer]!.root()
      dirs.push({ layer, ino: root.ino })
      if (root.opaque === 1) break
    }
    return this.withAttributes({ layer: top, ino: dirs[0]!.ino, inode: this.catalogs[top]!.root(), dirs })
  }

  /** The child NAME of directory DIR, or undefined if there is none (or it is whited out). */
  lookup (dir: MergedNode, name: string): MergedNode | undefined {
    let found: MergedNode | undefined
    for (const { layer, ino } of dir.dirs) {
      const catalog = this.catalogs[layer]!
      const entry = catalog.entry(ino, name)
      if (entry === undefined) continue
      if (entry.whiteout === 1 || entry.ino === null) {
        if (this.whiteout !== undefined) found = { layer, ino: this.whiteout.ino, inode: this.whiteout, dirs: [] }
        break
      }
      const inode = catalog.inode(entry.ino)!
      if (found === undefined) {
        found = { layer, ino: entry.ino, inode, dirs: isDir(inode.mode) ? [{ layer, ino: entry.ino }] : [] }
        if (!isDir(inode.mode) || inode.opaque === 1) break
      } else {
        // Below a directory, only a directory merges in; anything else is hidden, and so is what is under it.
        if (!isDir(inode.mode)) break
        found.dirs.push({ layer, ino: entry.ino })
        if (inode.opaque === 1) break
      }
    }
    return found !== undefined && found.dirs.length > 1 ? this.withAttributes(found) : found
  }

  /**
   * A merged directory shows the attributes (and xattrs) of its topmost copy that a
   * layer declared; copies a layer only implied by their children do not count.
   */
  private withAttributes (node: MergedNode): MergedNode {
    if (node.inode.implicit !== 1) return node
    for (const { layer, ino } of node.dirs) {
      const inode = this.catalogs[layer]!.inode(ino)!
      if (inode.implicit !== 1) return { ...node, layer, ino, inode }
    }
    return node
  }

  /** The directory's entries, merged across layers, sorted by name. */
  readdir (dir: MergedNode): Array<{ name: string, node: MergedNode }> {
    if (dir.dirs.length === 1) return this.readdirOneLayer(dir.dirs[0]!)
    const seen = new Set<string>()
    const names: string[] = []
    for (const { layer, ino } of dir.dirs) {
      for (const entry of this.catalogs[layer]!.children(ino)) {
        if (seen.has(entry.name)) continue
        seen.add(entry.name)
        if (entry.whiteout === 0 || this.overlayLower) names.push(entry.name)
      }
    }
    names.sort()
    const out: Array<{ name: string, node: MergedNode }> = []
    for (const name of names) {
      const node = this.lookup(dir, name)
      if (node !== undefined) out.push({ name, node })
    }
    return out
  }

  /**
   * `readdir` of a directory that only one layer has: its children are in that layer
   * alone, so each is its catalog row and inode, without a `lookup` (a query more per
   * entry) to merge it with layers that cannot have it, all from one query joining
   * entries and inodes (`Catalog.childInodes`). `find` lists every directory.
   */
  private readdirOneLayer ({ layer, ino }: { layer: number, ino: number }): Array<{ name: string, node: MergedNode }> {
    const catalog = this.catalogs[layer]!
    const out: Array<{ name: string, node: MergedNode }> = []
    for (const entry of catalog.childInodes(ino)) {
      if (entry.whiteout === 1 || entry.ino === null) {
        if (this.overlayLower && this.whiteout !== undefined) out.push({ name: entry.name, node: { layer, ino: this.whiteout.ino, inode: this.whiteout, dirs: [] } })
        continue
      }
      const inode = entry.inode
      if (inode === undefined) continue
      out.push({ name: entry.name, node: { layer, ino: entry.ino, inode, dirs: isDir(inode.mode) ? [{ layer, ino: entry.ino }] : [] } })
    }
    return out
  }

  /** Resolves an absolute or relative image path without following symlinks. */
  resolve (path: string): MergedNode | undefined {
    let node = this.root()
    for (const part of posix.normalize('/' + path).split('/')) {
      if (part === '') continue
      if (node.dirs.length === 0) return undefined
      const next = this.lookup(node, part)
      if (next === undefined) return undefined
      node = next
    }
    return node
  }

  /** Every path of the merged tree, parents before children, root as "/". */
  *walk (): Generator<[string, MergedNode]> {
    const stack: Array<[string, MergedNode]> = [['/', this.root()]]
    while (stack.length > 0) {
      const [path, node] = stack.pop()!
      yield [path, node]
      if (node.dirs.length > 0) {
        const children = this.readdir(node)
        for (let i = children.length - 1; i >= 0; i--) {
          const { name, node: child } = children[i]!
          stack.push([path === '/' ? `/${name}` : `${path}/${name}`, child])
        }
      }
    }
  }

  xattrs (node: MergedNode): Map<string, Buffer> {
    if (node.inode === this.whiteout) return new Map()
    const xattrs = this.catalogs[node.layer]!.xattrs(node.ino)
    if (this.overlayLower && node.inode.opaque === 1 && isDir(node.inode.mode)) xattrs.set('trusted.overlay.opaque', Buffer.from('y'))
    return xattrs
  }

  extents (node: MergedNode): Extent[] { return node.inode === this.whiteout ? [] : this.catalogs[node.layer]!.extents(node.ino) }
}
