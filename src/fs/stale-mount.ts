import { execFile } from 'node:child_process'
import { readFile, stat } from 'node:fs/promises'
import { resolve } from 'node:path'
import { promisify } from 'node:util'
import { MountError } from './errors.ts'

const execFileAsync = promisify(execFile)

/** Mounts stacked on one path by repeated crashes are peeled off one per unmount; stop at this many. */
const MAX_STACKED_MOUNTS = 8

/**
 * Removes a FUSE mount left at MOUNTPOINT, typically by an agent that died
 * without unmounting: its path then fails every access with "transport endpoint
 * is not connected" (ENOTCONN) until someone unmounts it. Detected by that
 * error or by a fuse entry for the path in /proc/self/mountinfo, and removed
 * with a lazy unmount (`fusermount -uz`), which works even while processes still
 * hold files open there. Any FUSE mount there goes, live or dead: the caller
 * owns the mount point. Non-FUSE mounts are left alone. Returns whether it
 * unmounted anything.
 */
export async function cleanStaleMount (mountpoint: string, options: { signal?: AbortSignal } = {}): Promise<boolean> {
  const path = resolve(mountpoint)
  let cleaned = false
  for (let i = 0; i < MAX_STACKED_MOUNTS && (await isFuseMount(path) || await isDeadEndpoint(path)); i++) {
    try {
      await execFileAsync('fusermount', ['-uz', path], { signal: options.signal, timeout: 10_000 })
    } catch (err) {
      const stderr = (err as { stderr?: string }).stderr?.trim()
      throw new MountError(`cannot unmount the stale FUSE mount at ${path}: ${stderr !== undefined && stderr !== '' ? stderr : (err as Error).message}`, { cause: err })
    }
    cleaned = true
  }
  return cleaned
}

/** Whether /proc/self/mountinfo lists a FUSE filesystem mounted at PATH (absolute). */
export async function isFuseMount (path: string): Promise<boolean> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  for (const line of mountinfo.split('\n')) {
    // "36 35 98:0 /root /mnt opts... - fstype source superopts": fields up to " - " are fixed.
    const [before, after] = line.split(' - ')
    if (after === undefined) continue
    const mountedAt = unescapeMountinfo(before!.split(' ')[4] ?? '')
    const fstype = after.split(' ')[0] ?? ''
    if (mountedAt === path && (fstype === 'fuse' || fstype.startsWith('fuse.'))) return true
  }
  return false
}

async function isDeadEndpoint (path: string): Promise<boolean> {
  try {
    await stat(path)
    return false
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOTCONN'
  }
}

/** mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...). */
function unescapeMountinfo (field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)))
}
