import { createHash, randomBytes } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import type { Readable } from 'node:stream'
import { FormatError, IntegrityError, NotFoundError } from '../errors.ts'
import { writeAtomic } from '../util/files.ts'
import { digestHex, parseDigest, sha256, type Digest } from './digest.ts'
import { Annotation, MediaType, type Descriptor, type ImageIndex } from './types.ts'

/**
 * An OCI image layout directory (image-spec image-layout.md): `oci-layout`,
 * `index.json` and content-addressed `blobs/sha256/<hex>`. Blob writes are atomic
 * (temp file in the layout, fsync, rename), so a crash never leaves a torn blob
 * under its digest name.
 */
export class OciLayout {
  readonly dir: string
  private constructor (dir: string) { this.dir = dir }

  /** Opens an existing layout; fails with a clear message if DIR is not one. */
  static async open (dir: string): Promise<OciLayout> {
    let marker: string
    try {
      marker = await readFile(join(dir, 'oci-layout'), 'utf8')
    } catch {
      throw new NotFoundError(`${dir} is not an OCI image layout (no oci-layout file); create one with skopeo copy or umoci init`)
    }
    let version: unknown
    try { version = (JSON.parse(marker) as { imageLayoutVersion?: unknown }).imageLayoutVersion } catch { /* reported below */ }
    if (version !== '1.0.0') throw new FormatError(`${dir}/oci-layout: unsupported imageLayoutVersion ${JSON.stringify(version)} (expected "1.0.0")`)
    return new OciLayout(dir)
  }

  /** Opens DIR as a layout, creating an empty one if it does not exist yet. */
  static async create (dir: string): Promise<OciLayout> {
    try {
      return await OciLayout.open(dir)
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err
    }
    await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true })
    await writeAtomic(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
    await writeAtomic(join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [] }))
    return new OciLayout(dir)
  }

  blobPath (digest: Digest): string {
    // Validated here too: digests from manifests reach this, and a crafted one must not name a path outside.
    return join(this.dir, 'blobs', 'sha256', digestHex(parseDigest(digest)))
  }

  async hasBlob (digest: Digest): Promise<boolean> {
    try { await stat(this.blobPath(digest)); return true } catch { return false }
  }

  async blobSize (digest: Digest): Promise<number> {
    try {
      return (await stat(this.blobPath(digest))).size
    } catch {
      throw new NotFoundError(`blob ${digest} is missing from ${this.dir}`)
    }
  }

  /** Reads a whole blob and checks its digest: use for manifests, configs, catalogs. */
  async readBlob (digest: Digest, what = 'blob'): Promise<Buffer> {
    let data: Buffer
    try {
      data = await readFile(this.blobPath(digest))
    } catch {
      throw new NotFoundError(`${what} ${digest} is missing from ${this.dir}`)
    }
    if (sha256(data) !== digest) throw new IntegrityError(`${what} ${digest}`, `content does not match its digest (${this.blobPath(digest)} is corrupt)`)
    return data
  }

  async readJson<T> (digest: Digest, what: string): Promise<T> {
    const data = await this.readBlob(digest, what)
    try { return JSON.parse(data.toString('utf8')) as T } catch (err) {
      throw new FormatError(`${what} ${digest} is not valid JSON`, { cause: err })
    }
  }

  openBlobStream (digest: Digest): Readable {
    return createReadStream(this.blobPath(digest))
  }

  async writeBlob (data: Uint8Array): Promise<Digest> {
    const digest = sha256(data)
    if (await this.hasBlob(digest)) return digest
    const tmp = this.tempPath()
    await writeAtomic(this.blobPath(digest), data, { tmp })
    return digest
  }

  async writeJsonBlob (value: unknown, mediaType: string, extra: Partial<Descriptor> = {}): Promise<Descriptor> {
    const data = Buffer.from(JSON.stringify(value))
    const digest = await this.writeBlob(data)
    return { mediaType, digest, size: data.length, ...extra }
  }

  /**
   * A blob written incrementally (packs, catalogs): data goes to a temp file and is
   * hashed on the way; `commit()` fsyncs and renames it to its digest.
   */
  async createBlobWriter (): Promise<BlobWriter> {
    await mkdir(join(this.dir, 'blobs', 'sha256'), { recursive: true })
    return new BlobWriter(this, this.tempPath())
  }

  /**
   * Moves a finished file (e.g. a SQLite catalog) into the store under its digest.
   * `created` is false when the store already held that blob.
   */
  async importFile (path: string): Promise<{ digest: Digest, size: number, created: boolean }> {
    const hash = createHash('sha256')
    let size = 0
    for await (const chunk of createReadStream(path)) { hash.update(chunk as Buffer); size += (chunk as Buffer).length }
    const digest: Digest = `sha256:${hash.digest('hex')}`
    if (await this.hasBlob(digest)) {
      await rm(path, { force: true })
      return { digest, size, created: false }
    }
    await fsyncPath(path)
    await rename(path, this.blobPath(digest))
    return { digest, size, created: true }
  }

  /**
   * Removes a blob. Only for blobs the caller itself just added (a conversion that
   * failed takes back what it wrote); a missing one is fine.
   */
  async removeBlob (digest: Digest): Promise<void> {
    await rm(this.blobPath(digest), { force: true })
  }

  tempPath (): string {
    return join(this.dir, 'blobs', `.tmp-${randomBytes(8).toString('hex')}`)
  }

  async readIndex (): Promise<ImageIndex> {
    let text: string
    try { text = await readFile(join(this.dir, 'index.json'), 'utf8') } catch {
      throw new NotFoundError(`${this.dir}/index.json is missing`)
    }
    let index: ImageIndex
    try { index = JSON.parse(text) as ImageIndex } catch (err) {
      throw new FormatError(`${this.dir}/index.json is not valid JSON`, { cause: err })
    }
    if (!Array.isArray(index.manifests)) throw new FormatError(`${this.dir}/index.json has no manifests list`)
    for (const m of index.manifests) m.digest = parseDigest(m.digest, `${this.dir}/index.json entry`)
    return index
  }

  /** The descriptor tagged TAG in index.json. */
  async resolveTag (tag: string): Promise<Descriptor> {
    const index = await this.readIndex()
    const found = index.manifests.filter(m => m.annotations?.[Annotation.refName] === tag)
    if (found.length === 0) {
      const tags = index.manifests.map(m => m.annotations?.[Annotation.refName]).filter(t => t !== undefined)
      throw new NotFoundError(`no image tagged "${tag}" in ${this.dir} (tags: ${tags.length > 0 ? tags.join(', ') : 'none'})`)
    }
    return found[found.length - 1]!
  }

  async tags (): Promise<Map<string, Descriptor>> {
    const out = new Map<string, Descriptor>()
    for (const m of (await this.readIndex()).manifests) {
      const tag = m.annotations?.[Annotation.refName]
      if (tag !== undefined) out.set(tag, m)
    }
    return out
  }

  /** Points TAG at DESCRIPTOR, replacing an older entry with the same tag; atomic. */
  async setTag (tag: string, descriptor: Descriptor): Promise<void> {
    const index = await this.readIndex()
    index.manifests = index.manifests.filter(m => m.annotations?.[Annotation.refName] !== tag)
    index.manifests.push({ ...descriptor, annotations: { ...descriptor.annotations, [Annotation.refName]: tag } })
    await writeAtomic(join(this.dir, 'index.json'), JSON.stringify(index, null, 2), { tmp: this.tempPath() })
  }
}

export class BlobWriter {
  private readonly layout: OciLayout
  readonly path: string
  private readonly hash = createHash('sha256')
  private handle: Awaited<ReturnType<typeof open>> | undefined
  size = 0

  constructor (layout: OciLayout, path: string) {
    this.layout = layout
    this.path = path
  }

  async write (data: Uint8Array): Promise<void> {
    this.handle ??= await open(this.path, 'w')
    this.hash.update(data)
    let written = 0
    while (written < data.length) {
      const { bytesWritten } = await this.handle.write(data, written, data.length - written)
      written += bytesWritten
    }
    this.size += data.length
  }

  /** Stores the blob under its digest; `created` is false when the store already held it. */
  async commit (): Promise<{ digest: Digest, size: number, created: boolean }> {
    this.handle ??= await open(this.path, 'w')
    await this.handle.sync()
    await this.handle.close()
    const digest: Digest = `sha256:${this.hash.digest('hex')}`
    const created = !await this.layout.hasBlob(digest)
    if (created) await rename(this.path, this.layout.blobPath(digest))
    else await rm(this.path, { force: true })
    return { digest, size: this.size, created }
  }

  async abort (): Promise<void> {
    await this.handle?.close().catch(() => {})
    await rm(this.path, { force: true })
  }
}

async function fsyncPath (path: string): Promise<void> {
  const fh = await open(path, 'r+')
  try { await fh.sync() } finally { await fh.close() }
}

/** Streams a readable into a file (used for oci-archive extraction). */
export async function streamToFile (source: AsyncIterable<Uint8Array>, path: string): Promise<void> {
  await pipeline(source, createWriteStream(path))
}
