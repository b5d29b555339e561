/**
 * Types for the parts of fuse-native 2.2.6 that shoal uses (the package ships
 * none). Results go back through callbacks: an errno as a negative number
 * (Fuse.ENOENT, ...) or 0, plus the op's value; `read` passes the byte count
 * in place of the error.
 */
declare module 'fuse-native' {
  namespace Fuse {
    /** Numbers only: fuse-native packs them into Uint32 fields (so st_ino is 32-bit); times are ms. */
    interface Stat {
      mode: number
      uid: number
      gid: number
      size: number
      nlink: number
      ino: number
      rdev: number
      blksize: number
      blocks: number
      atime: number
      mtime: number
      ctime: number
    }

    interface Statfs {
      bsize: number
      frsize: number
      blocks: number
      bfree: number
      bavail: number
      files: number
      ffree: number
      favail: number
      fsid: number
      flag: number
      namemax: number
    }

    type Done = (code: number) => void

    interface Operations {
      init?: (cb: Done) => void
      statfs?: (path: string, cb: (code: number, statfs?: Statfs) => void) => void
      getattr?: (path: string, cb: (code: number, stat?: Stat) => void) => void
      readdir?: (path: string, cb: (code: number, names?: string[], stats?: Stat[]) => void) => void
      readlink?: (path: string, cb: (code: number, target?: string) => void) => void
      open?: (path: string, flags: number, cb: (code: number, fd?: number) => void) => void
      read?: (path: string, fd: number, buffer: Buffer, length: number, position: number, cb: Done) => void
      release?: (path: string, fd: number, cb: Done) => void
      getxattr?: (path: string, name: string, position: number, cb: (code: number, value?: Buffer) => void) => void
      listxattr?: (path: string, cb: (code: number, names?: string[]) => void) => void
    }

    interface Options {
      /** Per-op deadline (ms) after which fuse-native answers ETIMEDOUT itself; default 15000. */
      timeout?: number | false
      fsname?: string
      /** Emitted as `subtype=VALUE`: options are comma-joined, so more can ride on it. */
      subtype?: string
      allowOther?: boolean
      defaultPermissions?: boolean
      kernelCache?: boolean
      autoCache?: boolean
      entryTimeout?: number
      attrTimeout?: number
      mkdir?: boolean
      debug?: boolean
    }
  }

  class Fuse {
    constructor (mountpoint: string, ops: Fuse.Operations, options?: Fuse.Options)
    readonly mnt: string
    protected readonly ops: Fuse.Operations
    mount (cb: (err: Error | null) => void): void
    unmount (cb: (err: Error | null) => void): void

    /**
     * Internal dispatchers of the xattr ops, overridden by ImageFuse. `reply`
     * gets a byte count or a negative errno, then the buffer it filled.
     */
    protected _op_getxattr (reply: (code: number, buffer: ArrayBuffer) => void, path: string, name: string, buffer: Buffer, position: number): void
    protected _op_listxattr (reply: (code: number, buffer: ArrayBuffer) => void, path: string, buffer: Buffer): void
    /** Its dispatchers, indexed by the binding's op numbers; called from its constructor. ImageFuse replaces some. */
    protected _makeHandlerArray (): unknown[]
    /** The per-op deadline (ms) it was given; 0 for none. */
    protected readonly timeout: number

    static readonly ENOENT: number
    static readonly EIO: number
    static readonly EBADF: number
    static readonly EINVAL: number
    static readonly ENOTDIR: number
    static readonly ERANGE: number
    static readonly ENODATA: number
  }

  export = Fuse
}
