/**
 * The on-disk layout of the snapshotter, as containerd's overlay snapshotter has it:
 * `<root>/snapshots/<id>/fs` (the upper dir, or a remote layer's mount point) and
 * `<root>/snapshots/<id>/work` (overlay's workdir, active snapshots only).
 *
 * Removal refuses to recurse into anything still mounted: a remote layer's FUSE
 * mount that failed to unmount must not have `rm -r` walk into it (and a read-only
 * mount would make the removal fail half-way anyway). The directory then stays for
 * a later Cleanup.
 */
import { chmod, chown, mkdir, readdir, readFile, rm } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { ShoalError } from '../errors.ts'

export class SnapshotDirs {
  readonly root: string
  readonly snapshotsDir: string

  private constructor (root: string) {
    this.root = resolve(root)
    this.snapshotsDir = join(this.root, 'snapshots')
  }

  static async init (root: string): Promise<SnapshotDirs> {
    const dirs = new SnapshotDirs(root)
    // 0700: snapshot contents are image layers and container writes, root's business only.
    await mkdir(dirs.root, { recursive: true, mode: 0o700 })
    await mkdir(dirs.snapshotsDir, { recursive: true, mode: 0o700 })
    return dirs
  }

  dir (id: number | string): string { return join(this.snapshotsDir, String(id)) }
  fsDir (id: number | string): string { return join(this.snapshotsDir, String(id), 'fs') }
  workDir (id: number | string): string { return join(this.snapshotsDir, String(id), 'work') }

  /**
   * Makes snapshot `id`'s directories. `fs` is 0755 whatever the umask (a container's
   * root directory is 0755, and containerd's testsuite checks it) and, for a child,
   * owned like its parent's fs, so the merged root keeps the image's owner.
   */
  async create (id: number, options: { work: boolean, owner?: { uid: number, gid: number } }): Promise<void> {
    await mkdir(this.dir(id), { mode: 0o700 })
    await mkdir(this.fsDir(id))
    await chmod(this.fsDir(id), 0o755)
    if (options.owner !== undefined) await chown(this.fsDir(id), options.owner.uid, options.owner.gid)
    if (options.work) {
      await mkdir(this.workDir(id))
      await chmod(this.workDir(id), 0o711)
    }
  }

  /** The names of every snapshot directory on disk (ids, and whatever else a crash left). */
  async names (): Promise<string[]> {
    return await readdir(this.snapshotsDir)
  }

  /** Whether anything is mounted at or below snapshot directory `name`. */
  async isMounted (name: number | string): Promise<boolean> {
    return (await mountpointsBelow(this.dir(name))).length > 0
  }

  /** Deletes snapshot directory `name`, unless something is still mounted inside it. */
  async remove (name: number | string): Promise<void> {
    const dir = this.dir(name)
    const mounted = await mountpointsBelow(dir)
    if (mounted.length > 0) {
      throw new ShoalError('ESNAPSHOT_MOUNTED', `not removing ${dir}: ${mounted.join(', ')} is still mounted; unmount it, and Cleanup will remove the directory`)
    }
    await rm(dir, { recursive: true, force: true, maxRetries: 3 })
  }
}

/** Mount points at or below DIR, from /proc/self/mountinfo. */
export async function mountpointsBelow (dir: string): Promise<string[]> {
  const base = resolve(dir)
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  const found: string[] = []
  for (const line of mountinfo.split('\n')) {
    // "36 35 98:0 /root /mnt/x rw,... - type source opts": the mount point is field 5.
    const field = line.split(' ')[4]
    if (field === undefined) continue
    const mountpoint = unescapeMountinfo(field)
    if (mountpoint === base || mountpoint.startsWith(base + '/')) found.push(mountpoint)
  }
  return found
}

/** mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...). */
function unescapeMountinfo (path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)))
}
