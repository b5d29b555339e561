/**
 * Images whose layer tars a test writes byte for byte, for input that the synthetic
 * helper (./synthetic.ts) cannot express: names that are not UTF-8, tars that end
 * without padding or end-of-archive blocks (as `umoci insert` 0.4.7 writes them),
 * bytes after the end of the archive, and manifests with a wrong layer size.
 *
 *   const tar = Buffer.concat([encodeEntry({ name: 'a', type: 'file' }, body)]) // no end blocks
 *   const image = await buildImageFromTars(dir, 't', [tar])
 */
import { posix } from 'node:path'
import { gzipSync, zstdCompressSync } from 'node:zlib'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type Descriptor, type ImageConfig, type ImageManifest } from '../../src/oci/types.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { SYNTHETIC_MTIME, contentBytes, layerTar, type Compression, type SyntheticEntry, type SyntheticImage } from './synthetic.ts'
import { END_OF_ARCHIVE, encodeEntry } from './tar.ts'

const BLOCK = 512

const LAYER_MEDIA_TYPE: Record<Compression, string> = {
  none: MediaType.ociLayerTar,
  gzip: MediaType.ociLayerGzip,
  zstd: MediaType.ociLayerZstd
}

/**
 * Writes an image whose layers are the uncompressed tars TARS, taken as they are
 * (no end blocks added), into the OCI layout DIR, tagged TAG. Digests and diff_ids
 * are those of the bytes given, so the image is consistent whatever the tars hold.
 */
export async function buildImageFromTars (dir: string, tag: string, tars: Buffer[], options: { compression?: Compression } = {}): Promise<SyntheticImage> {
  const compression = options.compression ?? 'gzip'
  const layout = await OciLayout.create(dir)
  const layers: Descriptor[] = []
  for (const tar of tars) {
    const blob = compression === 'gzip' ? gzipSync(tar) : compression === 'zstd' ? zstdCompressSync(tar) : tar
    layers.push({ mediaType: LAYER_MEDIA_TYPE[compression], digest: await layout.writeBlob(blob), size: blob.length })
  }
  const diffIds = tars.map(t => sha256(t))
  const created = SYNTHETIC_MTIME.toISOString()
  const config: ImageConfig = {
    architecture: 'amd64',
    os: 'linux',
    created,
    config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/sh'], WorkingDir: '/' },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: tars.map((_, i) => ({ created, created_by: `shoal raw layer ${i + 1}` }))
  }
  const configDescriptor = await layout.writeJsonBlob(config, MediaType.ociConfig)
  const manifest: ImageManifest = { schemaVersion: 2, mediaType: MediaType.ociManifest, config: configDescriptor, layers }
  const manifestDescriptor = await layout.writeJsonBlob(manifest, MediaType.ociManifest)
  await layout.setTag(tag, manifestDescriptor)
  return { ref: `oci:${dir}:${tag}`, manifestDigest: manifestDescriptor.digest, configDigest: configDescriptor.digest, layerDigests: layers.map(d => d.digest), diffIds }
}

/** Rewrites the manifest tagged TAG in the layout DIR through EDIT and retags it; returns the new manifest digest. */
export async function rewriteManifest (dir: string, tag: string, edit: (manifest: ImageManifest) => void): Promise<Digest> {
  const layout = await OciLayout.open(dir)
  const old = await layout.resolveTag(tag)
  const manifest = await layout.readJson<ImageManifest>(old.digest, 'manifest')
  edit(manifest)
  const desc = await layout.writeJsonBlob(manifest, MediaType.ociManifest)
  await layout.setTag(tag, desc)
  return desc.digest
}

/**
 * A one-member tar entry (ustar header + padded body) whose name field holds NAME
 * byte for byte, as GNU tar writes a name that is not UTF-8 (no pax record).
 * NAME must fit the 100-byte name field.
 */
export function entryWithRawName (name: Buffer, type: 'file' | 'directory' | 'symlink' = 'file', body: Buffer = Buffer.alloc(0), linkname?: Buffer): Buffer {
  if (name.length > 100 || (linkname?.length ?? 0) > 100) throw new RangeError('raw names must fit the ustar fields (100 bytes)')
  const entry = encodeEntry({ name: 'x'.repeat(name.length), type, mode: type === 'directory' ? 0o755 : 0o644, mtime: SYNTHETIC_MTIME, ...(linkname !== undefined ? { linkname: 'x'.repeat(linkname.length) } : {}) }, body)
  name.copy(entry, 0)
  if (linkname !== undefined) linkname.copy(entry, 157)
  fixChecksum(entry.subarray(0, BLOCK))
  return entry
}

/**
 * The layer tar of ENTRIES as `umoci insert` 0.4.7 writes it: it ends right after the
 * last member's data, with neither padding to 512 bytes nor end-of-archive blocks.
 * The last entry must be a file (its content decides how much padding to drop).
 */
export function unpaddedLayerTar (entries: SyntheticEntry[]): Buffer {
  const last = entries[entries.length - 1]
  if (last?.type !== 'file') throw new Error('the last entry of an unpadded layer must be a file')
  const full = layerTar(entries)
  const size = contentBytes(last.content).length
  const padding = (BLOCK - (size % BLOCK)) % BLOCK
  return full.subarray(0, full.length - END_OF_ARCHIVE.length - padding)
}

/** A directory path DEPTH levels deep (`d/d/.../d`), and a file at its bottom. */
export function deepPathEntries (depth: number, component = 'd'): SyntheticEntry[] {
  const dir = Array.from({ length: depth }, () => component).join('/')
  return [{ type: 'file', path: posix.join(dir, 'bottom'), content: 'deep\n' }]
}

function fixChecksum (header: Buffer): void {
  header.fill(0x20, 148, 156)
  let sum = 0
  for (const byte of header) sum += byte
  header.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1')
}
