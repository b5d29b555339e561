import { lstat, readlink } from 'node:fs/promises'
import type { Stats } from 'node:fs'
import { join } from 'node:path'
import { NotFoundError } from '../errors.ts'

/**
 * Resolves PATH as a process chrooted into ROOT would: absolute symlink targets start
 * again at ROOT and `..` stops at ROOT, so nothing on the host outside ROOT is ever
 * looked at. Returns the resolved path inside ROOT (`/usr/bin/python3.11`).
 */
export async function resolveInRoot (root: string, path: string): Promise<string> {
  const pending = path.split('/').filter(part => part !== '' && part !== '.')
  const resolved: string[] = []
  let symlinks = 0
  while (pending.length > 0) {
    const name = pending.shift()!
    if (name === '..') { resolved.pop(); continue }
    const hostPath = join(root, ...resolved, name)
    let st: Stats
    try {
      st = await lstat(hostPath)
    } catch (err) {
      throw new NotFoundError(`${path} does not resolve inside ${root}: /${[...resolved, name].join('/')} is missing`)
    }
    if (!st.isSymbolicLink()) { resolved.push(name); continue }
    if (++symlinks > 40) throw new NotFoundError(`${path} does not resolve inside ${root}: too many levels of symbolic links`)
    const target = await readlink(hostPath)
    if (target.startsWith('/')) resolved.length = 0
    pending.unshift(...target.split('/').filter(part => part !== '' && part !== '.'))
  }
  return `/${resolved.join('/')}`
}
