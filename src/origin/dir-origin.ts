import { open, type FileHandle } from 'node:fs/promises'
import { OriginError } from '../errors.ts'
import { parseDigest, type Digest } from '../oci/digest.ts'
import { OciLayout } from '../oci/layout.ts'
import { MediaType, type Descriptor } from '../oci/types.ts'
import type { Origin, OriginRequestOptions } from './origin.ts'

const DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024

/**
 * An origin that is an OCI image layout directory on this machine (a converted
 * image before it is published, a shared NFS mount, tests). Same contract as
 * HttpOrigin: exact lengths, OriginError with status 404 for a missing blob,
 * NotFoundError for a missing tag. Local reads are not retried: a failing disk
 * does not get better in 100 ms.
 */
export class DirOrigin implements Origin {
  readonly name: string
  readonly layout: OciLayout

  constructor (layout: OciLayout) {
    this.layout = layout
    this.name = layout.dir
  }

  /** Opens DIR, failing clearly if it is not an OCI image layout. */
  static async open (dir: string): Promise<DirOrigin> {
    return new DirOrigin(await OciLayout.open(dir))
  }

  async resolve (ref: string, options: OriginRequestOptions = {}): Promise<Descriptor> {
    options.signal?.throwIfAborted()
    if (ref.startsWith('sha256:')) {
      const digest = parseDigest(ref, 'image reference')
      const listed = (await this.layout.readIndex()).manifests.find(m => m.digest === digest)
      if (listed !== undefined) return listed
      const size = await this.withBlob(digest, async (_, size) => size)
      return { mediaType: MediaType.ociManifest, digest, size }
    }
    return await this.layout.resolveTag(ref)
  }

  async getBlob (blob: Digest, options: OriginRequestOptions & { maxBytes?: number } = {}): Promise<Uint8Array> {
    options.signal?.throwIfAborted()
    const maxBytes = options.maxBytes ?? DEFAULT_MAX_BLOB_BYTES
    return await this.withBlob(blob, async (handle, size) => {
      if (size > maxBytes) throw new OriginError(`blob ${blob} is ${size} bytes, more than the ${maxBytes} expected`, { retryable: false })
      return await readExactly(handle, blob, 0, size, options.signal)
    })
  }

  async getRange (blob: Digest, offset: number, length: number, options: OriginRequestOptions = {}): Promise<Uint8Array> {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new RangeError(`invalid range: offset ${offset}, length ${length}`)
    }
    options.signal?.throwIfAborted()
    return await this.withBlob(blob, async (handle, size) => {
      if (offset + length > size) {
        throw new OriginError(`blob ${blob} bytes ${offset}-${offset + length - 1}: past the end of the blob (size ${size})`, { retryable: false })
      }
      return await readExactly(handle, blob, offset, length, options.signal)
    })
  }

  /** Opens the blob (one handle: the size and the bytes come from the same file). */
  private async withBlob<T> (blob: Digest, use: (handle: FileHandle, size: number) => Promise<T>): Promise<T> {
    const path = this.layout.blobPath(parseDigest(blob, 'blob digest'))
    let handle: FileHandle
    try {
      handle = await open(path, 'r')
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code === 'ENOENT' || code === 'ENOTDIR') throw new OriginError(`blob ${blob} not found in ${this.name}`, { status: 404, retryable: false })
      throw new OriginError(`blob ${blob}: cannot open ${path}: ${code ?? String(err)}`, { retryable: false, cause: err })
    }
    try {
      return await use(handle, (await handle.stat()).size)
    } finally {
      await handle.close()
    }
  }
}

/** Reads LENGTH bytes at OFFSET; the abort signal is checked between reads. */
async function readExactly (handle: FileHandle, blob: Digest, offset: number, length: number, signal: AbortSignal | undefined): Promise<Uint8Array> {
  const out = new Uint8Array(length)
  let filled = 0
  while (filled < length) {
    signal?.throwIfAborted()
    const { bytesRead } = await handle.read(out, filled, Math.min(length - filled, 4 * 1024 * 1024), offset + filled)
    if (bytesRead === 0) {
      // The file shrank after we checked its size: it is being replaced or is damaged.
      throw new OriginError(`blob ${blob}: read ${filled} of ${length} bytes at offset ${offset}, the file ended early`, { retryable: false })
    }
    filled += bytesRead
  }
  return out
}
