/**
 * umoci as the independent reference reader of OCI images: `umoci unpack` applies
 * the layers (whiteouts, opaque dirs, hard links, xattrs, owners when run as root)
 * into a runtime bundle; what it produces is what a converter's merged view must equal.
 */
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { runTool, type ToolOptions } from './exec.ts'
import { readTree, type TreeNode } from './rootfs.ts'

/**
 * Unpacks IMAGE (`DIR:TAG` of an OCI layout) into the new bundle directory BUNDLE.
 * umoci 0.4.7 cannot read zstd layers: convert such images with skopeo first.
 */
export async function umociUnpack (image: string, bundle: string, options: ToolOptions = {}): Promise<void> {
  await runTool('umoci', ['unpack', '--image', image, bundle], options)
}

/** The tree of an unpacked bundle's rootfs, with xattrs taken from umoci's mtree manifest. */
export async function readUnpackedTree (bundle: string): Promise<Map<string, TreeNode>> {
  const tree = await readTree(join(bundle, 'rootfs'))
  for (const [path, xattrs] of await readMtreeXattrs(bundle)) {
    const node = tree.get(path)
    if (node === undefined) throw new Error(`${bundle}: the mtree lists xattrs for ${path}, which is not in rootfs/`)
    node.xattrs = xattrs
  }
  return tree
}

/**
 * xattrs per path from the `sha256_*.mtree` that `umoci unpack` writes after reading
 * the extracted tree back (Node cannot call getxattr itself). The mtree is
 * hierarchical: a `type=dir` line enters a directory, `..` leaves it; names are
 * vis(3)-encoded (`\040`, octal UTF-8 bytes, `\\`); values are base64.
 */
export async function readMtreeXattrs (bundle: string): Promise<Map<string, Record<string, Buffer>>> {
  const mtrees = (await readdir(bundle)).filter(name => /^sha256_[0-9a-f]{64}\.mtree$/.test(name))
  if (mtrees.length !== 1) throw new Error(`${bundle}: expected one sha256_*.mtree written by umoci unpack, found ${mtrees.length}`)
  const text = await readFile(join(bundle, mtrees[0]!), 'utf8')
  const result = new Map<string, Record<string, Buffer>>()
  const dirs: string[] = []
  for (const line of text.split('\n').map(l => l.trim())) {
    if (line === '' || line.startsWith('#') || line.startsWith('/')) continue
    if (line === '..') { dirs.pop(); continue }
    const [rawName, ...keywords] = line.split(' ')
    const name = unvis(rawName!)
    // The first directory line is the root, '.'.
    const path = `/${[...dirs, name].slice(1).join('/')}`
    if (keywords.includes('type=dir')) dirs.push(name)
    const xattrs: Record<string, Buffer> = {}
    for (const keyword of keywords) {
      const match = /^xattr\.([^=]+)=(.*)$/.exec(keyword)
      if (match !== null) xattrs[match[1]!] = Buffer.from(match[2]!, 'base64')
    }
    if (Object.keys(xattrs).length > 0) result.set(path, xattrs)
  }
  return result
}

function unvis (name: string): string {
  const bytes: number[] = []
  for (let i = 0; i < name.length;) {
    if (name[i] === '\\' && /^[0-7]{3}$/.test(name.slice(i + 1, i + 4))) {
      bytes.push(parseInt(name.slice(i + 1, i + 4), 8)); i += 4
    } else if (name.startsWith('\\\\', i)) {
      bytes.push(0x5c); i += 2
    } else {
      bytes.push(...Buffer.from(name[i]!)); i += 1
    }
  }
  return Buffer.from(bytes).toString('utf8')
}
