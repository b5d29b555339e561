/**
 * The read path assembled as the agent will: a converted synthetic image, its
 * verified catalogs (openImageView), a disk cache, a resolver whose remote
 * source is the origin through a RangeReader, and (for FUSE tests) a real mount
 * read from child processes.
 */
import { createPrivateKey, createPublicKey } from 'node:crypto'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { OriginChunkSource } from '../../src/fetch/chunk-source.ts'
import { ChunkResolver, type ChunkResolverOptions } from '../../src/fetch/resolver.ts'
import type { Extent } from '../../src/format/catalog.ts'
import { openImageView, type ImageView } from '../../src/image/image-view.ts'
import { mountImage, type MountedImage } from '../../src/fs/mount.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import type { Origin } from '../../src/origin/origin.ts'
import { RangeReader } from '../../src/origin/range-reader.ts'
import { runTool } from '../helpers/exec.ts'
import { buildSyntheticImage, type Compression, type SyntheticImage, type SyntheticLayer } from '../helpers/synthetic.ts'

/**
 * A fixed ed25519 key (PKCS#8 DER: the RFC 8410 prefix, then a 32-byte seed), so
 * that child processes trust the images the test process converted.
 */
const privateKey = createPrivateKey({ key: Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), Buffer.alloc(32, 7)]), format: 'der', type: 'pkcs8' })
export const signingKeys = { privateKey, publicKey: createPublicKey(privateKey) }

export interface ConvertedImage {
  /** The converted shoal image's OCI layout. */
  layoutDir: string
  tag: string
  source: SyntheticImage
}

/** Builds a synthetic source image from LAYERS under DIR and converts it (signed) into DIR/shoal. */
export async function convertSynthetic (dir: string, layers: SyntheticLayer[], options: { tag?: string, compression?: Compression } = {}): Promise<ConvertedImage> {
  const tag = options.tag ?? 'img'
  const source = await buildSyntheticImage(join(dir, 'src'), tag, layers, { compression: options.compression ?? 'gzip' })
  const layoutDir = join(dir, 'shoal')
  await convertImage({ source: source.ref, dest: `oci:${layoutDir}:${tag}`, signingKey: signingKeys.privateKey })
  return { layoutDir, tag, source }
}

export interface ReadStack extends ImageView {
  origin: Origin
  ranges: RangeReader
  disk: DiskCache
  resolver: ChunkResolver
}

export interface ReadStackOptions extends Partial<Omit<ChunkResolverOptions, 'disk' | 'remote'>> {
  /** Default: a DirOrigin on the image's layout. */
  origin?: Origin
  /** Default: a new cache under DIR/cache. */
  disk?: DiskCache
}

/** Opens IMAGE's verified view and a resolver for its chunks; working files go under DIR. */
export async function openReadStack (dir: string, image: Pick<ConvertedImage, 'layoutDir' | 'tag'>, options: ReadStackOptions = {}): Promise<ReadStack> {
  const { origin: givenOrigin, disk: givenDisk, ...resolverOptions } = options
  const origin = givenOrigin ?? await DirOrigin.open(image.layoutDir)
  // The view's catalogs come from the layout directly: the origin under test may be down or corrupt.
  const opened = await openImageView(await DirOrigin.open(image.layoutDir), image.tag, { trusted: [signingKeys.publicKey], catalogDir: join(dir, 'catalogs') })
  const disk = givenDisk ?? await DiskCache.open({ dir: join(dir, 'cache'), maxBytes: 1 << 30 })
  const ranges = new RangeReader({ origin })
  const resolver = new ChunkResolver({ retryDelayMs: 10, ...resolverOptions, disk, remote: [new OriginChunkSource(ranges)] })
  return { ...opened, origin, ranges, disk, resolver }
}

/** Mounts STACK's image at MOUNTPOINT, runs FN, and always unmounts. */
export async function withMount<T> (stack: ReadStack, mountpoint: string, fn: (mount: MountedImage) => Promise<T>): Promise<T> {
  const mount = await mountImage({ mountpoint, view: stack.view, resolver: stack.resolver })
  try {
    return await fn(mount)
  } finally {
    await mount.unmount()
  }
}

export type ReadResult = { path: string, sha256: string } | { path: string, code: string }

const READER = fileURLToPath(new URL('./read-files.ts', import.meta.url))

/**
 * Reads PATHS concurrently in a child process (see read-files.ts) and returns a
 * digest or an errno name per path. The child's thread pool is large, so the
 * reads really are in flight at once; a read that hangs fails the test by timeout.
 */
export async function readInChild (paths: string[], options: { timeoutMs?: number } = {}): Promise<ReadResult[]> {
  const { stdout } = await runTool(process.execPath, [READER, JSON.stringify(paths)], { timeoutMs: options.timeoutMs ?? 60_000 })
  return JSON.parse(stdout) as ReadResult[]
}

/** The distinct chunk digests of a file's extents. */
export function distinctChunks (extents: readonly Extent[]): Set<string> {
  return new Set(extents.map(e => e.digest))
}
