import { execFile } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, readdir, readlink } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { S_IFMT, isDir, isLnk, isReg } from '../../src/format/catalog.ts'
import { decodeChunk } from '../../src/format/codec.ts'
import { sha256 } from '../../src/oci/digest.ts'
import type { MergedView, MergedNode } from '../../src/image/merged-view.ts'
import type { Origin } from '../../src/origin/origin.ts'

/** What two trees are compared on, per path. */
export interface NodeFacts {
  type: string
  mode: number // permission bits incl. setuid/setgid/sticky
  uid: number
  gid: number
  size?: number
  target?: string
  rdev?: number
  mtimeSec?: number
  sha256?: string
  xattrs: Record<string, string> // name -> hex
  /** Sorted paths of all names sharing this regular file's inode (hard links), if more than one. */
  links?: string[]
}

const TYPES: Record<number, string> = { 0o040000: 'dir', 0o100000: 'file', 0o120000: 'symlink', 0o020000: 'char', 0o060000: 'block', 0o010000: 'fifo', 0o140000: 'socket' }
const typeOf = (mode: number): string => TYPES[mode & S_IFMT] ?? 'unknown'

/** Walks a directory on disk (an unpacked rootfs, or a FUSE mount) without following symlinks. */
export async function snapshotDisk (root: string, options: { contents?: boolean, mtimes?: boolean } = {}): Promise<Map<string, NodeFacts>> {
  const out = new Map<string, NodeFacts>()
  const inodes = new Map<string, string[]>()
  const xattrs = await readAllXattrs(root)
  const visit = async (rel: string): Promise<void> => {
    const abs = rel === '/' ? root : join(root, rel)
    const st = await lstat(abs, { bigint: false })
    const facts: NodeFacts = { type: typeOf(st.mode), mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, xattrs: xattrs.get(rel) ?? {} }
    if (options.mtimes === true && !isDir(st.mode)) facts.mtimeSec = Math.floor(st.mtimeMs / 1000)
    if (isReg(st.mode)) {
      facts.size = st.size
      if (options.contents !== false) facts.sha256 = await hashFile(abs)
      if (st.nlink > 1) {
        const key = `${st.dev}:${st.ino}`
        inodes.set(key, [...(inodes.get(key) ?? []), rel])
        ;(facts as NodeFacts & { inodeKey?: string }).inodeKey = key
      }
    }
    if (isLnk(st.mode)) facts.target = await readlink(abs)
    if ((st.mode & S_IFMT) === 0o020000 || (st.mode & S_IFMT) === 0o060000) facts.rdev = st.rdev
    out.set(rel, facts)
    if (isDir(st.mode)) {
      for (const name of (await readdir(abs)).sort()) await visit(rel === '/' ? `/${name}` : `${rel}/${name}`)
    }
  }
  await visit('/')
  for (const facts of out.values()) {
    const f = facts as NodeFacts & { inodeKey?: string }
    if (f.inodeKey !== undefined) {
      const group = inodes.get(f.inodeKey)!
      if (group.length > 1) f.links = [...group].sort()
      delete f.inodeKey
    }
  }
  return out
}

/** The same facts from a merged catalog view; file content is rebuilt from the chunks at ORIGIN. */
export async function snapshotView (view: MergedView, origin: Origin | undefined, options: { mtimes?: boolean } = {}): Promise<Map<string, NodeFacts>> {
  const out = new Map<string, NodeFacts>()
  const groups = new Map<string, string[]>()
  const keys = new Map<string, string>()
  for (const [path, node] of view.walk()) {
    const i = node.inode
    const xattrs: Record<string, string> = {}
    for (const [k, v] of view.xattrs(node)) xattrs[k] = v.toString('hex')
    const facts: NodeFacts = { type: typeOf(i.mode), mode: i.mode & 0o7777, uid: i.uid, gid: i.gid, xattrs }
    if (options.mtimes === true && !isDir(i.mode)) facts.mtimeSec = Math.floor(i.mtime / 1000)
    if (isReg(i.mode)) {
      facts.size = i.size
      if (origin !== undefined) facts.sha256 = await hashNode(view, node, origin)
      const key = `${node.layer}:${node.ino}`
      groups.set(key, [...(groups.get(key) ?? []), path])
      keys.set(path, key)
    }
    if (isLnk(i.mode)) facts.target = i.target ?? ''
    if ((i.mode & S_IFMT) === 0o020000 || (i.mode & S_IFMT) === 0o060000) facts.rdev = i.rdev
    out.set(path, facts)
  }
  for (const [path, key] of keys) {
    const group = groups.get(key)!
    if (group.length > 1) out.get(path)!.links = [...group].sort()
  }
  return out
}

/** Differences between two snapshots, one line each; empty means equal. */
export function diffSnapshots (expected: Map<string, NodeFacts>, actual: Map<string, NodeFacts>, limit = 50): string[] {
  const diffs: string[] = []
  for (const [path, e] of expected) {
    const a = actual.get(path)
    if (a === undefined) { diffs.push(`missing: ${path} (${e.type})`); continue }
    for (const key of new Set([...Object.keys(e), ...Object.keys(a)]) as Set<keyof NodeFacts>) {
      const ev = JSON.stringify(e[key])
      const av = JSON.stringify(a[key])
      if (ev !== av) diffs.push(`${path}: ${key} expected ${ev}, got ${av}`)
    }
  }
  for (const path of actual.keys()) if (!expected.has(path)) diffs.push(`unexpected: ${path} (${actual.get(path)!.type})`)
  return diffs.slice(0, limit)
}

async function hashFile (path: string): Promise<string> {
  const h = createHash('sha256')
  for await (const piece of createReadStream(path)) h.update(piece as Buffer)
  return h.digest('hex')
}

async function hashNode (view: MergedView, node: MergedNode, origin: Origin): Promise<string> {
  const h = createHash('sha256')
  for (const e of view.extents(node)) {
    const stored = await origin.getRange(e.pack, e.packOffset, e.storedLength)
    const data = decodeChunk(stored, e.codec, e.length)
    if (sha256(data) !== e.digest) throw new Error(`chunk ${e.digest} failed verification`)
    h.update(data)
  }
  return h.digest('hex')
}

const execFileAsync = promisify(execFile)

/** All extended attributes under ROOT, by path relative to it, values in hex (getfattr, package attr). */
async function readAllXattrs (root: string): Promise<Map<string, Record<string, string>>> {
  const out = new Map<string, Record<string, string>>()
  const { stdout } = await execFileAsync('getfattr', ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', root], { maxBuffer: 256 << 20 }).catch((err: { stdout?: string }) => ({ stdout: err.stdout ?? '' }))
  let current: Record<string, string> | undefined
  for (const line of stdout.split('\n')) {
    if (line.startsWith('# file: ')) {
      const abs = line.slice(8)
      const rel = abs === root ? '/' : abs.slice(root.length)
      current = {}
      out.set(rel, current)
    } else if (current !== undefined && line.includes('=')) {
      const eq = line.indexOf('=')
      const value = line.slice(eq + 1)
      current[line.slice(0, eq)] = value.startsWith('0x') ? value.slice(2) : Buffer.from(value.replace(/^"|"$/g, '')).toString('hex')
    }
  }
  return out
}
