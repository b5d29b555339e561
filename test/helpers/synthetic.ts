/**
 * Synthetic OCI images built in-process for unit tests: every layer is written from a
 * list of entries, so a test states exactly which tar members (including hostile ones)
 * an image holds. Output is deterministic (fixed mtimes, generated content from seeds),
 * so digests are stable across runs.
 *
 *   const image = await buildSyntheticImage(dir, 'app', [
 *     [{ type: 'dir', path: 'etc' }, { type: 'file', path: 'etc/motd', content: 'hi\n', mode: 0o600 }],
 *     { entries: [{ type: 'whiteout', path: 'etc/motd' }], compression: 'zstd' }
 *   ])
 *   // image.ref === `oci:${dir}:app`
 *
 * The ready-made layer set that exercises whiteouts, hard links, xattrs and friends,
 * with its expected merged view, is in ./standard-layers.ts.
 */
import { createCipheriv, createHash } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { posix } from 'node:path'
import { gzipSync, zstdCompressSync } from 'node:zlib'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type Descriptor, type ImageConfig, type ImageManifest, type RuntimeConfig } from '../../src/oci/types.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { END_OF_ARCHIVE, encodeEntry, type TarHeader } from './tar.ts'

export type Compression = 'gzip' | 'zstd' | 'none'

/** Every entry's mtime unless it says otherwise; fixed so that layer digests are stable. */
export const SYNTHETIC_MTIME = new Date('2024-01-02T03:04:05Z')

/** Content made from a seed: incompressible, deterministic, any size. */
export interface GeneratedContent { size: number, seed: string }

interface Attributes {
  /** Tar member name as written, e.g. `etc/passwd` (directories get their trailing slash added). */
  path: string
  /** Permission bits including setuid/setgid/sticky; default 0644, 0755 for dirs, 0777 for symlinks. */
  mode?: number
  uid?: number
  gid?: number
  mtime?: Date
  /** Written as pax `SCHILY.xattr.NAME` records; Buffer values are kept byte-exact. */
  xattrs?: Record<string, string | Buffer>
}

export type SyntheticEntry =
  | Attributes & { type: 'file', content: string | Buffer | GeneratedContent }
  | Attributes & { type: 'dir' }
  | Attributes & { type: 'symlink', target: string }
  /** `target` is the tar member name of the earlier entry this is a hard link to. */
  | Attributes & { type: 'hardlink', target: string }
  | Attributes & { type: 'char' | 'block', major: number, minor: number }
  | Attributes & { type: 'fifo' }
  /** Hides PATH from lower layers: writes `DIR/.wh.NAME`. */
  | { type: 'whiteout', path: string }
  /** Hides everything below directory PATH in lower layers: writes `PATH/.wh..wh..opq`. */
  | { type: 'opaque', path: string }
  /** Written verbatim, unchecked: for hostile members (`../../etc/passwd`, `/etc/x`, duplicates, lying sizes). */
  | { type: 'raw', header: TarHeader, body?: Buffer }

export type SyntheticLayer = SyntheticEntry[] | {
  entries: SyntheticEntry[]
  /** Overrides the image-wide compression for this layer. */
  compression?: Compression
  /**
   * Cuts the uncompressed tar after this many bytes (then compresses it), for
   * truncated-archive tests. The diff_id is that of the cut tar, so only the
   * truncation itself is wrong.
   */
  truncateAt?: number
}

export interface SyntheticImageOptions {
  /** Default compression of every layer (default gzip). */
  compression?: Compression
  /** Merged over a default config (PATH env, Cmd /bin/sh, WorkingDir /). */
  config?: Partial<RuntimeConfig>
  /** Writes a wrong rootfs.diff_ids[0] into the config (the returned diffIds stay true). */
  corruptDiffId?: boolean
  /**
   * Flips a byte of the first layer's blob after writing it, so its content no longer
   * matches its digest. The blob store is shared by all images in DIR: use a
   * directory of its own for this.
   */
  corruptLayerDigest?: boolean
}

export interface SyntheticImage {
  /** `oci:DIR:TAG` */
  ref: string
  manifestDigest: Digest
  configDigest: Digest
  /** Digests of the layer blobs as stored (compressed). */
  layerDigests: Digest[]
  /** sha256 of each uncompressed layer tar. */
  diffIds: Digest[]
}

const LAYER_MEDIA_TYPE: Record<Compression, string> = {
  none: MediaType.ociLayerTar,
  gzip: MediaType.ociLayerGzip,
  zstd: MediaType.ociLayerZstd
}

/** Writes an image made of LAYERS into the OCI layout DIR (created if needed), tagged TAG. */
export async function buildSyntheticImage (dir: string, tag: string, layers: SyntheticLayer[], options: SyntheticImageOptions = {}): Promise<SyntheticImage> {
  const layout = await OciLayout.create(dir)
  const layerDescriptors: Descriptor[] = []
  const diffIds: Digest[] = []
  for (const [index, layer] of layers.entries()) {
    const spec = Array.isArray(layer) ? { entries: layer } : layer
    const compression = spec.compression ?? options.compression ?? 'gzip'
    let tar = layerTar(spec.entries)
    if (spec.truncateAt !== undefined) tar = tar.subarray(0, spec.truncateAt)
    const blob = compress(tar, compression)
    const digest = await layout.writeBlob(blob)
    if (index === 0 && options.corruptLayerDigest === true) await flipByte(layout.blobPath(digest))
    layerDescriptors.push({ mediaType: LAYER_MEDIA_TYPE[compression], digest, size: blob.length })
    diffIds.push(sha256(tar))
  }

  const configuredDiffIds = [...diffIds]
  if (options.corruptDiffId === true) {
    if (diffIds.length === 0) throw new Error('corruptDiffId needs at least one layer')
    configuredDiffIds[0] = sha256(Buffer.from(`not the diff_id of ${diffIds[0]}`))
  }
  const created = SYNTHETIC_MTIME.toISOString()
  const config: ImageConfig = {
    architecture: 'amd64',
    os: 'linux',
    created,
    config: {
      Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
      Cmd: ['/bin/sh'],
      WorkingDir: '/',
      ...options.config
    },
    rootfs: { type: 'layers', diff_ids: configuredDiffIds },
    history: layers.map((_, i) => ({ created, created_by: `shoal synthetic layer ${i + 1}` }))
  }
  const configDescriptor = await layout.writeJsonBlob(config, MediaType.ociConfig)
  const manifest: ImageManifest = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: configDescriptor,
    layers: layerDescriptors
  }
  const manifestDescriptor = await layout.writeJsonBlob(manifest, MediaType.ociManifest)
  await layout.setTag(tag, manifestDescriptor)
  return {
    ref: `oci:${dir}:${tag}`,
    manifestDigest: manifestDescriptor.digest,
    configDigest: configDescriptor.digest,
    layerDigests: layerDescriptors.map(d => d.digest),
    diffIds
  }
}

/** The uncompressed tar of one layer, end-of-archive blocks included. */
export function layerTar (entries: SyntheticEntry[]): Buffer {
  return Buffer.concat([...entries.map(encodeSyntheticEntry), END_OF_ARCHIVE])
}

/** The bytes of a file entry's content. */
export function contentBytes (content: string | Buffer | GeneratedContent): Buffer {
  if (typeof content === 'string') return Buffer.from(content)
  if (Buffer.isBuffer(content)) return content
  return generatedBytes(content)
}

/**
 * AES-128-CTR keystream keyed by the seed: fast, incompressible and reproducible, so
 * a test can regenerate the expected bytes of a multi-MiB file from two numbers.
 */
export function generatedBytes ({ size, seed }: GeneratedContent): Buffer {
  const key = createHash('sha256').update(seed).digest().subarray(0, 16)
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(size))
}

function encodeSyntheticEntry (entry: SyntheticEntry): Buffer {
  switch (entry.type) {
    case 'raw':
      return encodeEntry(entry.header, entry.body)
    case 'whiteout': {
      const dir = posix.dirname(entry.path)
      const name = `.wh.${posix.basename(entry.path)}`
      return encodeEntry({ name: dir === '.' ? name : `${dir}/${name}`, type: 'file', mtime: SYNTHETIC_MTIME })
    }
    case 'opaque':
      return encodeEntry({ name: `${entry.path.replace(/\/+$/, '')}/.wh..wh..opq`, type: 'file', mtime: SYNTHETIC_MTIME })
  }
  const header: TarHeader = {
    name: entry.path,
    mode: entry.mode ?? (entry.type === 'dir' ? 0o755 : entry.type === 'symlink' ? 0o777 : 0o644),
    uid: entry.uid ?? 0,
    gid: entry.gid ?? 0,
    mtime: entry.mtime ?? SYNTHETIC_MTIME,
    pax: Object.fromEntries(Object.entries(entry.xattrs ?? {}).map(([name, value]) => [`SCHILY.xattr.${name}`, value]))
  }
  switch (entry.type) {
    case 'file': return encodeEntry({ ...header, type: 'file' }, contentBytes(entry.content))
    case 'dir': return encodeEntry({ ...header, type: 'directory', name: entry.path.endsWith('/') ? entry.path : `${entry.path}/` })
    case 'symlink': return encodeEntry({ ...header, type: 'symlink', linkname: entry.target })
    case 'hardlink': return encodeEntry({ ...header, type: 'link', linkname: entry.target })
    case 'char': return encodeEntry({ ...header, type: 'character-device', devmajor: entry.major, devminor: entry.minor })
    case 'block': return encodeEntry({ ...header, type: 'block-device', devmajor: entry.major, devminor: entry.minor })
    case 'fifo': return encodeEntry({ ...header, type: 'fifo' })
  }
}

function compress (tar: Buffer, compression: Compression): Buffer {
  switch (compression) {
    case 'none': return tar
    case 'gzip': return gzipSync(tar)
    case 'zstd': return zstdCompressSync(tar)
  }
}

async function flipByte (path: string): Promise<void> {
  const data = await readFile(path)
  data[data.length >> 1] ^= 0xff
  await writeFile(path, data)
}
