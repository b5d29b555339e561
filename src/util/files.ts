import { randomBytes } from 'node:crypto'
import { open, rename, rm } from 'node:fs/promises'

/**
 * Write to a temp file, fsync, rename over the target: readers see old or new, never half,
 * and a crash cannot leave a complete-looking name over bytes that never reached the disk.
 * `mode` is the new file's (0600 for state that is its owner's alone): given at creation, so
 * the file is never readable by others, not even between its creation and a chmod. Default:
 * 0666 less the umask. `tmp` names the temp file (default: beside the target); it is removed
 * when the write fails.
 */
export async function writeAtomic (path: string, data: string | Uint8Array, options: { tmp?: string, mode?: number } = {}): Promise<void> {
  const tmp = options.tmp ?? `${path}.tmp-${randomBytes(6).toString('hex')}`
  try {
    const fh = await open(tmp, 'wx', options.mode)
    try {
      await fh.writeFile(data)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {})
    throw err
  }
}
