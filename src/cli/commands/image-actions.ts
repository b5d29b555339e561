import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { UsageError } from '../../errors.ts'
import { convertImage, type ConvertReport } from '../../convert/convert.ts'
import { parseCompression } from '../../format/codec.ts'
import type { Digest } from '../../oci/digest.ts'
import { generateKeys, imageName, loadPrivateKey, loadPublicKey, parseLifetime, SIGNATURE_PAYLOAD_TYPE, signatureTag, type DsseEnvelope, type SignatureInfo, type SignaturePayload } from '../../format/signing.ts'
import { inspectImage, type ImageSummary } from '../../image/inspect-image.ts'
import { signImage } from '../../image/sign-image.ts'
import { verifyImage } from '../../image/verify-image.ts'
import { OciLayout } from '../../oci/layout.ts'
import { parseReference } from '../../oci/reference.ts'
import type { ImageManifest } from '../../oci/types.ts'
import type { Platform } from '../../convert/source-image.ts'
import type { RegistryAccess } from '../../registry/client.ts'
import { pushToRegistry, type PushReport } from '../../registry/push.ts'
import { DirOrigin } from '../../origin/dir-origin.ts'
import type { Origin } from '../../origin/origin.ts'
import { RegistryOrigin } from '../../origin/registry-origin.ts'
import { parseSize } from '../args.ts'
import { mib, progressBar, table } from '../output.ts'
import type { ConvertFlags, ReadFlags, RegistryFlags, SignFlags } from './image.ts'

// The actions of the commands defined in image.ts, loaded only when one of them runs.

export async function keygen (opts: { out: string }): Promise<void> {
  const { privatePath, publicPath, keyid } = await generateKeys(opts.out)
  console.log(`wrote ${privatePath} and ${publicPath} (key id ${keyid})`)
}

export async function convert (source: string, dest: string, opts: ConvertFlags): Promise<void> {
  const signingKey = await loadPrivateKey(opts.key)
  const signing = signFlags(opts)
  const bar = progressBar('converting', 'bytes')
  let report: ConvertReport
  try {
    report = await convertImage({
      source,
      dest,
      signingKey,
      signing,
      chunkSize: parseSize(opts.chunkSize, '--chunk-size'),
      packSize: parseSize(opts.packSize, '--pack-size'),
      compression: parseCompression(opts.compression),
      ...(opts.platform !== undefined ? { platform: parsePlatform(opts.platform) } : {}),
      sourceRegistry: registryAccess(opts, opts.srcCreds),
      destRegistry: registryAccess(opts, opts.destCreds),
      mountFrom: opts.mountFrom,
      onProgress: p => bar.update(p.bytesRead, p.bytesTotal)
    })
  } finally {
    bar.stop()
  }
  if (opts.json === true) { console.log(JSON.stringify(report, null, 2)); return }
  printConvertReport(report)
  if (report.push !== undefined) console.log(pushSummary(report.push))
}

export async function push (image: string, dest: string, opts: RegistryFlags & { json?: boolean }): Promise<void> {
  const ref = parseReference(image)
  if (ref.transport !== 'oci') throw new UsageError(`${image}: name the shoal image to push as oci:DIR:TAG`)
  const layout = await OciLayout.open(ref.dir)
  const report = await pushToRegistry(layout, ref.tag, dest, { access: registryAccess(opts, opts.destCreds), mountFrom: opts.mountFrom })
  console.log(opts.json === true ? JSON.stringify(report, null, 2) : pushSummary(report))
  await warnUnsignedName(layout, report.manifestDigest, dest)
}

export async function sign (image: string, opts: ReadFlags & SignFlags & { key: string, json?: boolean }): Promise<void> {
  const key = await loadPrivateKey(opts.key)
  const r = await signImage(image, key, { ...signFlags(opts), access: registryAccess({ ...opts, mountFrom: [] }, opts.creds) })
  if (opts.json === true) { console.log(JSON.stringify(r, null, 2)); return }
  const was = r.replaced === 'v1' ? ' (replaced a v1 signature)' : r.previous !== undefined ? ` (was version ${r.previous.version}, expiring ${r.previous.expires ?? 'never'})` : ''
  console.log(`signed ${image} ${r.manifestDigest}${was}`)
  console.log(signatureLines(r).map(l => `  ${l}`).join('\n'))
}

export async function verify (image: string, opts: { trust: string[], name?: string } & ReadFlags): Promise<void> {
  const { origin, tag } = await openShoalImage(image, opts)
  const trusted = await Promise.all(opts.trust.map(loadPublicKey))
  await withTempDir(async workDir => {
    const bar = progressBar('verifying packs', 'items')
    try {
      const r = await verifyImage(origin, tag, { trusted, workDir, image, ...(opts.name !== undefined ? { expectName: opts.name } : {}), onProgress: (d, t) => bar.update(d, t) })
      bar.stop()
      console.log(`OK ${image} ${r.manifestDigest}: signed by key ${r.signedBy}; ${r.catalogs} catalogs, ${r.files} files, ${r.packs} packs, ${r.chunks} chunks (${mib(r.bytes)}) verified`)
      console.log(signatureLines(r.signature).map(l => `  ${l}`).join('\n'))
    } finally {
      bar.stop()
    }
  })
}

export async function inspect (image: string, opts: { trust?: string[], json?: boolean } & ReadFlags): Promise<void> {
  const { origin, tag } = await openShoalImage(image, opts)
  const trusted = opts.trust !== undefined ? await Promise.all(opts.trust.map(loadPublicKey)) : 'skip' as const
  const summary = await withTempDir(workDir => inspectImage(origin, tag, { trusted, workDir, image }))
  if (opts.json === true) console.log(JSON.stringify(summary, null, 2))
  else printSummary(image, summary)
}

/** Tells whoever pushes an image under a name its signature does not carry that agents mounting that name will refuse it. */
async function warnUnsignedName (layout: OciLayout, manifest: Digest, dest: string): Promise<void> {
  const d = parseReference(dest)
  if (d.transport !== 'docker') return
  const name = imageName(d.repository, d.tag ?? 'latest', d.registry)
  try {
    const sig = await layout.readJson<ImageManifest>((await layout.resolveTag(signatureTag(manifest))).digest, 'signature')
    const envelope = await layout.readJson<DsseEnvelope>(sig.layers[0]!.digest, 'envelope')
    const names = envelope.payloadType === SIGNATURE_PAYLOAD_TYPE ? (JSON.parse(Buffer.from(envelope.payload, 'base64').toString('utf8')) as SignaturePayload).names : []
    if (!names.includes(name)) console.error(`note: the image is signed for ${names.length > 0 ? names.join(', ') : 'no name (a v1 signature)'}, not for ${name}: agents mounting ${name} refuse it (pods naming the source image still work if it is among them). To add it: shoal sign ${dest} --key KEY --name ${name}${names.map(n => ` --name ${n}`).join('')}`)
  } catch {}
}

/** --name, --signed-version, --expires as signing parameters (absent ones left to the defaults). */
function signFlags (flags: SignFlags): { names?: string[], version?: number, lifetimeMs?: number | null } {
  let version: number | undefined
  if (flags.signedVersion !== undefined) {
    version = Number(flags.signedVersion)
    if (!/^\d+$/.test(flags.signedVersion.trim()) || !Number.isSafeInteger(version)) throw new UsageError(`--signed-version ${flags.signedVersion}: write a non-negative integer`)
  }
  for (const n of flags.name ?? []) {
    const first = n.includes('/') ? n.split('/')[0]! : ''
    if (n.includes('@') || first.includes('.') || first.includes(':') || first === 'localhost') throw new UsageError(`--name ${n}: write REPO:TAG without the registry host (e.g. team/app:1.2), or a bare TAG for a layout`)
  }
  return {
    ...(flags.name !== undefined ? { names: flags.name } : {}),
    ...(version !== undefined ? { version } : {}),
    ...(flags.expires !== undefined ? { lifetimeMs: parseLifetime(flags.expires) } : {})
  }
}

/** The lines verify, sign and inspect print about a signature. */
function signatureLines (s: Pick<SignatureInfo, 'names' | 'version' | 'signedAt' | 'expires'>): string[] {
  return [`names:     ${s.names.join(', ')}`, `version:   ${s.version}`, `signed at: ${s.signedAt}`, `expires:   ${s.expires ?? 'never'}`]
}

function registryAccess (flags: RegistryFlags, credentials: string | undefined): RegistryAccess {
  return {
    ...(credentials !== undefined ? { credentials } : {}),
    ...(flags.ca !== undefined ? { caFile: flags.ca } : {}),
    ...(flags.plainHttp === true ? { plainHttp: true } : {})
  }
}

function parsePlatform (text: string): Platform {
  const [os, architecture, variant, extra] = text.split('/')
  if (os === undefined || os === '' || architecture === undefined || architecture === '' || variant === '' || extra !== undefined) {
    throw new UsageError(`--platform ${text}: write OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64 or linux/arm64/v8`)
  }
  return { os, architecture, ...(variant !== undefined ? { variant } : {}) }
}

function pushSummary (r: PushReport): string {
  return `pushed ${r.dest} ${r.manifestDigest}: ${r.blobs.uploaded} blobs uploaded (${mib(r.uploadedBytes)}), ${r.blobs.mounted} mounted from other repositories, ${r.blobs.present} already there`
}

/** A shoal image in a local layout or a registry, as an origin and the tag (or digest) to resolve there. */
async function openShoalImage (image: string, flags: ReadFlags): Promise<{ origin: Origin, tag: string }> {
  const ref = parseReference(image)
  if (ref.transport === 'oci') return { origin: await DirOrigin.open(ref.dir), tag: ref.tag }
  if (ref.transport === 'docker') {
    const origin = await RegistryOrigin.open(`docker://${ref.registry}/${ref.repository}`, registryAccess({ ...flags, mountFrom: [] }, flags.creds))
    return { origin, tag: ref.digest ?? ref.tag ?? 'latest' }
  }
  throw new UsageError(`${image}: name a shoal image as oci:DIR:TAG or docker://HOST/REPO:TAG`)
}

async function withTempDir<T> (fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-'))
  try { return await fn(dir) } finally { await rm(dir, { recursive: true, force: true }) }
}

function printConvertReport (r: ConvertReport): void {
  const rows = [['layer', 'files', 'content', 'written', 'dedup in layer', 'from lower layers', 'shared with existing images', 'stored']]
  for (const [i, l] of r.layers.entries()) {
    rows.push([`${i} ${l.diffId.slice(7, 19)}`, String(l.files), mib(l.contentBytes), `${l.written.chunks} ch ${mib(l.written.bytes)}`,
      `${l.dedupInLayer.chunks} ch ${mib(l.dedupInLayer.bytes)}`, `${l.dedupEarlierLayer.chunks} ch ${mib(l.dedupEarlierLayer.bytes)}`,
      `${l.sharedWithExisting.chunks} ch ${mib(l.sharedWithExisting.bytes)}`, mib(l.storedBytes)])
  }
  console.log(table(rows))
  for (const [i, l] of r.layers.entries()) for (const n of l.notes) console.log(`note: layer ${i}: ${n}`)
  const shared = r.layers.reduce((n, l) => n + l.sharedWithExisting.chunks, 0)
  const sharedBytes = r.layers.reduce((n, l) => n + l.sharedWithExisting.bytes, 0)
  console.log(`${r.dest} ${r.manifestDigest}: ${mib(r.inputBytes)} of layer tars in ${r.seconds.toFixed(1)} s (${(r.inputBytes / 1048576 / r.seconds).toFixed(0)} MiB/s); ${shared} chunks (${mib(sharedBytes)}) shared with images already in the destination`)
}

function printSummary (image: string, s: ImageSummary): void {
  console.log(`${image} ${s.manifestDigest}`)
  console.log(`  signature: ${s.signature}`)
  if (s.signed !== undefined) for (const l of signatureLines(s.signed)) console.log(`  ${l}${s.signed.verified ? '' : ' (unchecked)'}`)
  console.log(`  source:    ${s.source.reference} ${s.source.manifestDigest}`)
  console.log(`  platform:  ${s.platform}; chunking ${JSON.stringify(s.chunking)}; compression ${s.compression}`)
  console.log(`  command:   ${JSON.stringify([...(s.runtime.Entrypoint ?? []), ...(s.runtime.Cmd ?? [])])}`)
  const rows = [['layer', 'files', 'content', 'chunks', 'chunk bytes', 'dedup in layer', 'shared with lower', 'packs', 'stored']]
  for (const [i, l] of s.layers.entries()) {
    rows.push([`${i} ${l.diffId.slice(7, 19)}`, String(l.files), mib(l.contentBytes), String(l.chunks), mib(l.chunkBytes), mib(l.dedupInLayerBytes),
      `${l.sharedWithLowerChunks} ch ${mib(l.sharedWithLowerBytes)}`, String(l.packs), mib(l.packBytes)])
  }
  const t = s.totals
  rows.push(['total', String(t.files), mib(t.contentBytes), String(t.uniqueChunks), mib(t.uniqueChunkBytes), '', '', '', mib(t.storedBytes)])
  console.log(table(rows))
}
