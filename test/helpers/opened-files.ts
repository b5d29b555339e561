import { lstat } from 'node:fs/promises'
import { join } from 'node:path'
import { runTool } from './exec.ts'
import { resolveInRoot } from './rootfs.ts'

/**
 * Runs ARGS chrooted in ROOTFS under strace and returns the regular files it opened
 * successfully (or executed), with their sizes: what a lazy mount must at most fetch.
 * ROOTFS must not be changed by the command (pass e.g. PYTHONDONTWRITEBYTECODE=1 via
 * /usr/bin/env in ARGS): it is often a cached reference tree.
 */
export async function openedFiles (rootfs: string, args: string[]): Promise<Map<string, number>> {
  const { stderr } = await runTool('strace', ['-f', '-qq', '-e', 'trace=open,openat,execve', '-e', 'signal=none', 'chroot', rootfs, ...args], { timeoutMs: 60_000 })
  const files = new Map<string, number>()
  for (const line of stderr.split('\n')) {
    // openat(AT_FDCWD, "/usr/lib/x.so", O_RDONLY|O_CLOEXEC) = 3   /   execve("/usr/bin/python3", ...) = 0
    const m = /(?:openat\(AT_FDCWD, |open\(|execve\()"([^"]+)".*\) = (\d+)/.exec(line)
    if (m === null) continue
    const path = m[1]!
    if (!path.startsWith('/') || files.has(path)) continue
    const real = await resolveInRoot(rootfs, path).catch(() => undefined)
    if (real === undefined) continue
    const st = await lstat(join(rootfs, real)).catch(() => undefined)
    if (st?.isFile() === true) files.set(path, st.size)
  }
  return files
}

export const sumSizes = (files: Map<string, number>): number => [...files.values()].reduce((a, b) => a + b, 0)
