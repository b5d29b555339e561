import { createHash, type KeyObject } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Transform, type TransformCallback } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createGunzip, createZstdDecompress } from 'node:zlib'
import { FormatError, IntegrityError, UsageError } from '../errors.ts'
import { Catalog, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG } from '../format/catalog.ts'
import { encodeChunkAsync, type CodecId, type Compression } from '../format/codec.ts'
import { sha256, type Digest } from '../oci/digest.ts'
import { parseShoalConfig, type ChunkingParams, type ShoalImageConfig, type ShoalLayer } from '../format/image-config.ts'
import { defaultSignedNames, writeSignedImage, type SigningParams } from '../image/write-image.ts'
import { OciLayout } from '../oci/layout.ts'
import { formatReference, parseReference } from '../oci/reference.ts'
import { openSourceImage, type Platform, type SourceImage } from './source-image.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../oci/types.ts'
import type { RegistryAccess } from '../registry/client.ts'
import { pushToRegistry, type PushReport } from '../registry/push.ts'
import { CatalogWriter, normalizeMemberPath } from './catalog-writer.ts'
import { ChunkIndex, PackWriter, type SealedPack } from './pack-writer.ts'
import { endingNotes, layerExtract, memberNames, xattrsOf, type TarHeader } from './tar.ts'
import { DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE } from './defaults.ts'

export { DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE }

/** Enough to keep the thread pool busy; bounds memory to a few chunks. */
const MAX_CHUNKS_IN_FLIGHT = 8

export interface ConvertOptions {
  source: string
  dest: string
  signingKey: KeyObject
  /** Names, version and lifetime of the signature (default names: defaultSignedNames). */
  signing?: Partial<SigningParams>
  chunkSize?: number
  compression?: Compression
  packSize?: number
  platform?: Platform
  /** Credentials, CA and plain-HTTP choice for a docker:// source and destination. */
  sourceRegistry?: RegistryAccess
  destRegistry?: RegistryAccess
  /** For a docker:// destination: repositories on its registry to mount existing blobs from. */
  mountFrom?: string[]
  /** For a docker:// destination: the directory to stage the converted image in (default $TMPDIR). */
  stagingDir?: string
  signal?: AbortSignal
  /** Called as layer bytes are read (compressed bytes of the source blobs). */
  onProgress?: (progress: { layer: number, layers: number, bytesRead: number, bytesTotal: number }) => void
}

/** Where the chunk occurrences of a layer came from. `bytes` are uncompressed. */
export interface DedupCounts { chunks: number, bytes: number }

export interface LayerReport {
  diffId: Digest
  sourceDigest: Digest
  catalog: Digest
  files: number
  contentBytes: number
  /** Chunks written to new packs. */
  written: DedupCounts
  /** Chunk occurrences that repeat one already in this layer. */
  dedupInLayer: DedupCounts
  /** ... already stored by an earlier layer of this image. */
  dedupEarlierLayer: DedupCounts
  /** ... already stored in the destination by another image. */
  sharedWithExisting: DedupCounts
  storedBytes: number
  notes: string[]
}

export interface ConvertReport {
  source: string
  /** The source's (platform) manifest, which a registry destination also tags the conversion by. */
  sourceManifestDigest: Digest
  dest: string
  manifestDigest: Digest
  layers: LayerReport[]
  /** Uncompressed tar bytes read. */
  inputBytes: number
  seconds: number
  /** For a docker:// destination: what the push did. */
  push?: PushReport
}

/** Converts an OCI image into a signed shoal image in an OCI layout or a registry. */
export async function convertImage (options: ConvertOptions): Promise<ConvertReport> {
  const started = process.hrtime.bigint()
  const destRef = parseReference(options.dest)
  if (destRef.transport === 'docker') return await convertToRegistry(options)
  if (destRef.transport !== 'oci') throw new UsageError(`destination ${options.dest}: shoal writes to oci:DIR:TAG or docker://HOST/REPO:TAG`)
  const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE
  const packSize = options.packSize ?? DEFAULT_PACK_SIZE
  if (!Number.isSafeInteger(packSize) || packSize < chunkSize) throw new UsageError(`pack size ${packSize} must be at least the chunk size (${chunkSize})`)
  if (!Number.isInteger(chunkSize) || chunkSize < 4096 || chunkSize > 16 << 20) throw new UsageError(`chunk size ${chunkSize} is out of range (4 KiB to 16 MiB)`)
  const chunking: ChunkingParams = { algorithm: 'fixed', chunkSize }
  const compression = options.compression ?? 'zstd'

  const source = await openSourceImage(parseReference(options.source), {
    ...(options.platform !== undefined ? { platform: options.platform } : {}),
    ...(options.sourceRegistry !== undefined ? { registry: options.sourceRegistry } : {}),
    ...(options.signal !== undefined ? { signal: options.signal } : {})
  })
  try {
    const dest = await OciLayout.create(destRef.dir)
    const index = await loadChunkIndex(dest)
    const packs = new PackWriter(dest, { targetSize: packSize })
    const packDigests = new Map<string, { digest: Digest, size: number }>()
    // Blobs this conversion added to the destination: taken back if it fails.
    const created: Digest[] = []
    const layers: ShoalLayer[] = []
    const reports: LayerReport[] = []
    let inputBytes = 0
    try {
      const bytesTotal = source.manifest.layers.reduce((n, l) => n + l.size, 0)
      let bytesBefore = 0
      for (const [i, layerDesc] of source.manifest.layers.entries()) {
        const onBytes = (n: number): void => options.onProgress?.({ layer: i, layers: source.manifest.layers.length, bytesRead: bytesBefore + n, bytesTotal })
        const result = await convertLayer({ source, layerIndex: i, layerDesc, dest, index, packs, packDigests, created, chunkSize, compression, onBytes, signal: options.signal })
        bytesBefore += layerDesc.size
        inputBytes += result.inputBytes
        layers.push(result.layer)
        reports.push(result.report)
      }
    } catch (err) {
      await packs.abort()
      // Only blobs that were not in the destination before: what other images use stays.
      for (const digest of new Set(created)) await dest.removeBlob(digest).catch(() => {})
      throw err
    }

    const config: ShoalImageConfig = {
      schemaVersion: 1,
      source: { reference: source.reference, manifestDigest: source.manifestDigest, configDigest: source.configDigest },
      architecture: source.config.architecture,
      os: source.config.os,
      runtime: source.config.config ?? {},
      chunking,
      compression,
      prefetch: [],
      layers
    }
    const manifestDesc = await writeSignedImage(dest, destRef.tag, config, options.signingKey, { ...options.signing, names: options.signing?.names ?? defaultSignedNames(options.source, options.dest) })
    return {
      source: source.reference,
      sourceManifestDigest: source.manifestDigest,
      dest: formatReference(destRef),
      manifestDigest: manifestDesc.digest,
      layers: reports,
      inputBytes,
      seconds: Number(process.hrtime.bigint() - started) / 1e9
    }
  } finally {
    await source.close()
  }
}

/**
 * A registry destination: the image is converted into a temporary layout (under
 * stagingDir or $TMPDIR; about the size of the converted image), then pushed, tag last (and the
 * digest tag agents serving containerd look for, see pushToRegistry). Chunks
 * are not deduplicated against images already in the registry, but blobs that
 * convert to the same bytes (a shared base layer) are not uploaded twice.
 */
async function convertToRegistry (options: ConvertOptions): Promise<ConvertReport> {
  const staging = await mkdtemp(join(options.stagingDir ?? tmpdir(), 'shoal-convert-'))
  try {
    const report = await convertImage({ ...options, signing: { ...options.signing, names: options.signing?.names ?? defaultSignedNames(options.source, options.dest) }, dest: `oci:${staging}:image` })
    const push = await pushToRegistry(await OciLayout.open(staging), 'image', options.dest, {
      ...(options.destRegistry !== undefined ? { access: options.destRegistry } : {}),
      ...(options.mountFrom !== undefined ? { mountFrom: options.mountFrom } : {}),
      ...(options.signal !== undefined ? { signal: options.signal } : {})
    })
    return { ...report, dest: push.dest, push }
  } finally {
    await rm(staging, { recursive: true, force: true })
  }
}

/** Indexes the chunks of every shoal image already in the destination, so they are reused. */
async function loadChunkIndex (dest: OciLayout): Promise<ChunkIndex> {
  const index = new ChunkIndex()
  const seen = new Set<Digest>()
  for (const desc of (await dest.tags()).values()) {
    if (desc.artifactType !== MediaType.shoalImage) continue
    const manifest = await dest.readJson<ImageManifest>(desc.digest, 'manifest')
    const config = parseShoalConfig(await dest.readBlob(manifest.config.digest, 'config'))
    for (const layer of config.layers) {
      if (seen.has(layer.catalog.digest)) continue
      seen.add(layer.catalog.digest)
      await dest.readBlob(layer.catalog.digest, 'catalog') // digest check before trusting it
      const catalog = new Catalog(dest.blobPath(layer.catalog.digest))
      try {
        const sizes = new Map(catalog.packs().map(p => [p.digest, p.size]))
        for (const chunk of catalog.allChunks()) index.add({ ...chunk, packSize: sizes.get(chunk.pack)!, from: 'existing' })
      } finally {
        catalog.close()
      }
    }
  }
  return index
}

interface LayerJob {
  source: SourceImage
  layerIndex: number
  layerDesc: Descriptor
  dest: OciLayout
  index: ChunkIndex
  packs: PackWriter
  packDigests: Map<string, { digest: Digest, size: number }>
  /** Where the layer records each blob it adds to the destination (packs, catalog). */
  created: Digest[]
  chunkSize: number
  compression: Compression
  onBytes: (n: number) => void
  signal: AbortSignal | undefined
}

async function convertLayer (job: LayerJob): Promise<{ layer: ShoalLayer, report: LayerReport, inputBytes: number }> {
  const { source, layerIndex, layerDesc, dest, index, packs, packDigests, compression } = job
  const diffId = source.config.rootfs.diff_ids[layerIndex]!
  const what = `layer ${layerIndex} (${layerDesc.digest})`
  const tmpCatalog = dest.tempPath()
  const finalCatalog = dest.tempPath()
  const catalog = new CatalogWriter(tmpCatalog, { diffId, sourceDigest: layerDesc.digest })
  const counts = { written: zero(), dedupInLayer: zero(), dedupEarlierLayer: zero(), sharedWithExisting: zero() }

  // Chunks go through a short FIFO: compression runs on the thread pool while the
  // tar is parsed and hashed here; results are written in order.
  const queue: Array<{ ino: number, offset: number, digest: Digest, length: number, encoded?: Promise<{ codec: CodecId, bytes: Uint8Array }> }> = []
  const inFlight = new Set<Digest>()
  const settle = async (): Promise<void> => {
    const item = queue.shift()!
    if (item.encoded === undefined) {
      catalog.addExtent(item.ino, item.offset, { digest: item.digest, length: item.length, packKey: '', packOffset: 0, storedLength: 0, codec: 0 })
      return
    }
    const { codec, bytes } = await item.encoded
    const { placed, sealed } = await packs.append(item.digest, item.length, codec, bytes)
    inFlight.delete(item.digest)
    catalog.addExtent(item.ino, item.offset, placed)
    if (sealed !== undefined) recordSealed(sealed)
  }
  const addChunk = async (ino: number, offset: number, data: Buffer): Promise<void> => {
    const digest = sha256(data)
    if (catalog.hasChunk(digest) || inFlight.has(digest)) {
      bump(counts.dedupInLayer, data.length)
      queue.push({ ino, offset, digest, length: data.length })
    } else {
      const known = index.get(digest)
      if (known !== undefined) {
        bump(known.from === 'existing' ? counts.sharedWithExisting : counts.dedupEarlierLayer, data.length)
        packDigests.set(known.pack, { digest: known.pack, size: known.packSize })
        // Registered at once so later duplicates in this layer find the row.
        catalog.addExtent(ino, offset, { ...known, packKey: known.pack })
        return
      }
      bump(counts.written, data.length)
      inFlight.add(digest)
      const encoded = encodeChunkAsync(data, compression)
      encoded.catch(() => {}) // awaited in settle(); this only stops an unhandled rejection meanwhile
      queue.push({ ino, offset, digest, length: data.length, encoded })
    }
    while (queue.length > MAX_CHUNKS_IN_FLIGHT) await settle()
  }
  const recordSealed = (sealed: SealedPack): void => {
    if (sealed.created) job.created.push(sealed.digest)
    packDigests.set(sealed.key, { digest: sealed.digest, size: sealed.size })
    for (const c of sealed.chunks) index.add({ ...c, packSize: sealed.size, from: 'converted' })
  }

  const compressedHash = createHash('sha256')
  const diffHash = createHash('sha256')
  let compressedBytes = 0
  let inputBytes = 0
  const { extract, ending } = layerExtract()
  const streamDone = pipeline(
    source.openLayer(layerDesc, job.signal),
    sizeChecked(layerDesc.size, `source ${what}`, chunk => { compressedHash.update(chunk); compressedBytes += chunk.length; job.onBytes(compressedBytes) }),
    decompressorFor(layerDesc.mediaType, what),
    tap(chunk => { diffHash.update(chunk); inputBytes += chunk.length }),
    extract,
    ...(job.signal !== undefined ? [{ signal: job.signal }] as const : [])
  )
  // Reading the tar and watching the pipeline race: an error on either side ends both.
  const streamFailed = streamDone.then(() => undefined, (err: unknown) => err)

  try {
    for await (const entry of extract) {
      const header = entry.header
      const names = memberNames(header)
      const path = normalizeMemberPath(names.name)
      const type = header.type
      if (type === 'link') {
        catalog.link(path, normalizeMemberPath(names.linkname ?? ''))
        entry.resume()
        continue
      }
      const mode = typeBits(type)
      if (mode === undefined) {
        catalog.note(`skipped ${path}: unsupported tar member type ${type}`)
        entry.resume()
        continue
      }
      const ino = catalog.add(path, {
        mode: mode | ((header.mode ?? 0) & 0o7777),
        uid: header.uid ?? 0,
        gid: header.gid ?? 0,
        mtime: header.mtime?.getTime() ?? 0,
        size: mode === S_IFREG ? header.size ?? 0 : mode === S_IFLNK ? Buffer.byteLength(names.linkname ?? '') : 0,
        rdev: mode === S_IFCHR || mode === S_IFBLK ? makedev(header.devmajor ?? 0, header.devminor ?? 0) : 0,
        ...(mode === S_IFLNK ? { target: names.linkname ?? '' } : {}),
        xattrs: xattrsOf(header, names.name)
      })
      if (mode === S_IFREG && ino !== undefined) {
        await chunkStream(entry as AsyncIterable<Buffer>, job.chunkSize, header.size ?? 0, (offset, data) => addChunk(ino, offset, data))
      } else {
        entry.resume()
      }
    }
    const failure = await streamFailed
    if (failure !== undefined) throw failure
    while (queue.length > 0) await settle()
    const sealed = await packs.seal()
    if (sealed !== undefined) recordSealed(sealed)
  } catch (err) {
    catalog.close()
    await rm(tmpCatalog, { force: true })
    extract.destroy()
    // A size or digest mismatch of the blob explains whatever the tar reader then met.
    const failure = await streamFailed
    throw layerError(failure instanceof IntegrityError ? failure : err, what, job.signal)
  }

  const compressedDigest: Digest = `sha256:${compressedHash.digest('hex')}`
  if (compressedDigest !== layerDesc.digest) {
    catalog.close()
    await rm(tmpCatalog, { force: true })
    throw new IntegrityError(`source ${what}`, `blob content hashes to ${compressedDigest}; the source image is corrupt`)
  }
  const actualDiffId: Digest = `sha256:${diffHash.digest('hex')}`
  if (actualDiffId !== diffId) {
    catalog.close()
    await rm(tmpCatalog, { force: true })
    throw new IntegrityError(`source ${what}`, `uncompressed content hashes to ${actualDiffId}, but the image config says diff_id ${diffId}; the source image is corrupt`)
  }

  const { files, contentBytes } = catalog.fileStats()
  const notes = [...endingNotes(ending()), ...catalog.notes]
  const packKeys = catalog.packKeys()
  try {
    catalog.finish(packDigests, finalCatalog)
  } catch (err) {
    await rm(finalCatalog, { force: true })
    throw err
  } finally {
    await rm(tmpCatalog, { force: true })
  }
  const { digest: catalogDigest, size: catalogSize, created } = await dest.importFile(finalCatalog)
  if (created) job.created.push(catalogDigest)
  const layerPacks = packKeys.map(k => packDigests.get(k)!)
  return {
    inputBytes,
    layer: { diffId, sourceDigest: layerDesc.digest, catalog: { digest: catalogDigest, size: catalogSize }, packs: layerPacks, files, contentBytes },
    report: {
      diffId,
      sourceDigest: layerDesc.digest,
      catalog: catalogDigest,
      files,
      contentBytes,
      ...counts,
      storedBytes: layerPacks.reduce((n, p) => n + p.size, 0),
      notes
    }
  }
}

/** Cuts a file's content into fixed-size chunks without holding more than one chunk. */
async function chunkStream (source: AsyncIterable<Buffer>, chunkSize: number, fileSize: number, onChunk: (offset: number, data: Buffer) => Promise<void>): Promise<void> {
  let offset = 0
  let buf = Buffer.allocUnsafe(Math.min(chunkSize, fileSize))
  let fill = 0
  for await (const piece of source) {
    let pos = 0
    while (pos < piece.length) {
      const n = Math.min(piece.length - pos, buf.length - fill)
      piece.copy(buf, fill, pos, pos + n)
      fill += n
      pos += n
      if (fill === buf.length) {
        await onChunk(offset, buf)
        offset += fill
        buf = Buffer.allocUnsafe(Math.min(chunkSize, fileSize - offset))
        fill = 0
      }
    }
  }
  if (fill > 0 || offset !== fileSize) throw new FormatError(`file content ended after ${offset + fill} of ${fileSize} bytes`)
}

/**
 * Passes a source blob through, calling FN on each piece, and fails with an
 * IntegrityError (naming WHAT) as soon as the blob is longer than SIZE, the size its
 * descriptor gives, or when it ends shorter.
 */
function sizeChecked (size: number, what: string, fn: (chunk: Buffer) => void): Transform {
  let seen = 0
  return new Transform({
    transform (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      seen += chunk.length
      if (seen > size) { cb(new IntegrityError(what, `the blob is longer than the ${size} bytes the manifest gives as its size; the source image is corrupt`)); return }
      fn(chunk)
      cb(null, chunk)
    },
    flush (cb: TransformCallback) {
      cb(seen === size ? null : new IntegrityError(what, `the blob is ${seen} bytes, but the manifest gives its size as ${size}; the source image is corrupt`))
    }
  })
}

function tap (fn: (chunk: Buffer) => void): Transform {
  return new Transform({ transform (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) { fn(chunk); cb(null, chunk) } })
}

function decompressorFor (mediaType: string, what: string): Transform {
  // 256 KiB output pieces: the default 16 KiB made the JS side of decompression cost as much as gzip itself.
  if (mediaType.endsWith('+gzip') || mediaType === MediaType.dockerLayerGzip) return createGunzip({ chunkSize: 256 << 10 })
  if (mediaType.endsWith('+zstd')) return createZstdDecompress({ chunkSize: 256 << 10 })
  if (mediaType === MediaType.ociLayerTar || mediaType.endsWith('.tar')) return tap(() => {})
  throw new FormatError(`${what} has media type ${mediaType}, which is not a tar layer shoal can read (tar, tar+gzip, tar+zstd)`)
}

function typeBits (type: TarHeader['type']): number | undefined {
  switch (type) {
    case 'file': case 'contiguous-file': return S_IFREG
    case 'directory': return S_IFDIR
    case 'symlink': return S_IFLNK
    case 'character-device': return S_IFCHR
    case 'block-device': return S_IFBLK
    case 'fifo': return S_IFIFO
    default: return undefined
  }
}

/** Linux's encoding of a device number (glibc gnu_dev_makedev). */
function makedev (major: number, minor: number): number {
  return (minor & 0xff) + (major & 0xfff) * 2 ** 8 + Math.floor(minor / 2 ** 8) * 2 ** 20 + Math.floor(major / 2 ** 12) * 2 ** 32
}

function layerError (err: unknown, what: string, signal: AbortSignal | undefined): unknown {
  if (signal?.aborted === true) return signal.reason
  if (err instanceof FormatError || err instanceof IntegrityError || err instanceof UsageError) {
    if (err.message.includes(what)) return err
    return new FormatError(`${what}: ${err.message}`, { cause: err })
  }
  const message = (err as Error)?.message ?? String(err)
  if (/unexpected end|Unexpected end|premature|truncated/i.test(message)) {
    return new FormatError(`${what} is truncated or corrupt (${message}); the source image is damaged`, { cause: err })
  }
  if (/^Z_/.test(String((err as { code?: unknown })?.code))) {
    return new FormatError(`${what} cannot be decompressed (${message}); the source image is corrupt`, { cause: err })
  }
  return new FormatError(`${what} could not be read: ${message}`, { cause: err })
}

const zero = (): DedupCounts => ({ chunks: 0, bytes: 0 })
const bump = (c: DedupCounts, bytes: number): void => { c.chunks++; c.bytes += bytes }
