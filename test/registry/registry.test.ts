import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { after, before, describe, test } from 'node:test'
import { convertImage, type ConvertReport } from '../../src/convert/convert.ts'
import { NotFoundError, OriginError } from '../../src/errors.ts'
import { sha256 } from '../../src/oci/digest.ts'
import { parseShoalConfig } from '../../src/format/image-config.ts'
import { signatureTag } from '../../src/format/signing.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { loadImage } from '../../src/image/load-image.ts'
import { signImage } from '../../src/image/sign-image.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type ImageManifest } from '../../src/oci/types.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { openOrigin } from '../../src/origin/open-origin.ts'
import { RegistryOrigin } from '../../src/origin/registry-origin.ts'
import { openRegistryClient, RegistryClient } from '../../src/registry/client.ts'
import { pushToRegistry } from '../../src/registry/push.ts'
import { bytes } from '../origin/helpers.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotView } from '../helpers/tree-snapshot.ts'
import { makeHtpasswd, skopeoCopy, startRegistry, startStorageServer, type TestRegistry } from './helpers.ts'

/**
 * shoal against Debian's docker-registry (distribution 2.8), plain HTTP and
 * anonymous here (TLS and basic auth: real-image.test.ts). The sources are the
 * standard synthetic image, pushed by skopeo as a Docker v2 image with gzip
 * layers and as an OCI image with zstd layers.
 */

const keys = generateKeyPairSync('ed25519')
const plain = { plainHttp: true }
/** One signing time and name for the conversions whose pushes are compared blob for blob. */
const sameSignature = { now: Date.now(), names: ['shoal/synthetic:v1'] }

// At the top level: removed when the file's tests are done (in a hook it would go when the hook does).
const dir = await tempDir()

describe('against a real registry (docker-registry, plain HTTP)', () => {
  const src = join(dir, 'src')
  let registry: TestRegistry

  before(async () => {
    registry = await startRegistry({ dir: join(dir, 'registry') })
    await buildSyntheticImage(src, 'gzip', standardSyntheticLayers(), { compression: 'gzip' })
    await buildSyntheticImage(src, 'zstd', standardSyntheticLayers(), { compression: 'zstd' })
    await skopeoCopy(`oci:${src}:gzip`, `docker://${registry.host}/synthetic:gzip`, { format: 'v2s2' })
    await skopeoCopy(`oci:${src}:zstd`, `docker://${registry.host}/synthetic:zstd`)
  })
  after(async () => { await registry?.stop() })

  const catalogs = (r: ConvertReport): string[] => r.layers.map(l => l.catalog)

  test('docker:// sources (Docker v2 + gzip, OCI + zstd) stream into the converter and give what their layout gives', async () => {
    const client = await openRegistryClient(registry.host, 'synthetic', plain)
    assert.equal((await client.resolveManifest('synthetic', 'gzip')).mediaType, MediaType.dockerManifest)
    assert.equal((await client.resolveManifest('synthetic', 'zstd')).mediaType, MediaType.ociManifest)
    client.close()
    for (const tag of ['gzip', 'zstd']) {
      const fromRegistry = await convertImage({ source: `docker://${registry.host}/synthetic:${tag}`, dest: `oci:${join(dir, 'pulled')}:${tag}`, signingKey: keys.privateKey, sourceRegistry: plain })
      const fromLayout = await convertImage({ source: `oci:${src}:${tag}`, dest: `oci:${join(dir, 'local')}:${tag}`, signingKey: keys.privateKey })
      assert.deepEqual(catalogs(fromRegistry), catalogs(fromLayout), tag)
      assert.equal(fromRegistry.inputBytes, fromLayout.inputBytes)
      assert.match(fromRegistry.source, new RegExp(`^docker://${registry.host}/synthetic:${tag}$`))
    }
  })

  test('a multi-platform index: the platform asked for is taken; a missing one is named', async () => {
    const client = await openRegistryClient(registry.host, 'synthetic', plain)
    const amd64 = await client.resolveManifest('synthetic', 'gzip')
    const arm64 = await client.resolveManifest('synthetic', 'zstd')
    const index = Buffer.from(JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        { ...amd64, platform: { os: 'linux', architecture: 'amd64' } },
        { ...arm64, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } }
      ]
    }))
    await client.putManifest('synthetic', 'multi', index, MediaType.ociIndex)
    client.close()
    const arm = await convertImage({ source: `docker://${registry.host}/synthetic:multi`, dest: `oci:${join(dir, 'multi')}:arm`, signingKey: keys.privateKey, sourceRegistry: plain, platform: { os: 'linux', architecture: 'arm64' } })
    const zstd = await convertImage({ source: `oci:${src}:zstd`, dest: `oci:${join(dir, 'multi-reference')}:zstd`, signingKey: keys.privateKey })
    assert.deepEqual(catalogs(arm), catalogs(zstd))
    await assert.rejects(convertImage({ source: `docker://${registry.host}/synthetic:multi`, dest: `oci:${join(dir, 'multi')}:x`, signingKey: keys.privateKey, sourceRegistry: plain, platform: { os: 'linux', architecture: 's390x' } }),
      (err: unknown) => err instanceof NotFoundError && /has no image for linux\/s390x \(it has: linux\/amd64, linux\/arm64\)/.test(err.message))
  })

  test('convert to docker://: blobs, signature, tag; verified and read through a RegistryOrigin', async () => {
    const dest = `docker://${registry.host}/shoal/synthetic:v1`
    const report = await convertImage({ source: `oci:${src}:gzip`, dest, signingKey: keys.privateKey, destRegistry: plain, signing: sameSignature })
    assert.equal(report.dest, dest)
    const manifestBlobs = report.layers.length + new Set(report.layers.flatMap(l => [l.catalog])).size
    assert.ok(report.push!.blobs.uploaded >= manifestBlobs, JSON.stringify(report.push))
    assert.equal(report.push!.blobs.present + report.push!.blobs.mounted, 0)

    const origin = await openOrigin(`docker://${registry.host}/shoal/synthetic`, { registry: plain })
    assert.ok(origin instanceof RegistryOrigin)
    const desc = await origin.resolve('v1')
    assert.equal(desc.digest, report.manifestDigest)
    assert.equal((await origin.resolve(signatureTag(desc.digest))).mediaType, MediaType.ociManifest)
    const verified = await verifyImage(origin, 'v1', { trusted: [keys.publicKey], workDir: join(dir, 'verify') })
    assert.equal(verified.manifestDigest, report.manifestDigest)

    // The same image in a layout must look the same, file for file, byte for byte.
    await convertImage({ source: `oci:${src}:gzip`, dest: `oci:${join(dir, 'same')}:v1`, signingKey: keys.privateKey })
    const local = await DirOrigin.open(join(dir, 'same'))
    const remote = await openImageView(origin, 'v1', { trusted: [keys.publicKey], catalogDir: join(dir, 'catalogs-remote') })
    const reference = await openImageView(local, 'v1', { trusted: [keys.publicKey], catalogDir: join(dir, 'catalogs-local') })
    try {
      const actual = await snapshotView(remote.view, origin, { mtimes: true })
      assert.ok(actual.size > 50)
      assert.deepEqual(diffSnapshots(await snapshotView(reference.view, local, { mtimes: true }), actual), [])
    } finally {
      remote.close()
      reference.close()
    }
    assert.ok((origin as RegistryOrigin).stats.requests > 0)
    await assert.rejects(openOrigin(`docker://${registry.host}/shoal/synthetic:v1`), /an origin is a repository \(docker:\/\/127\.0\.0\.1:\d+\/shoal\/synthetic\)/)
  })

  test('pushing again skips every blob; another repository mounts them instead of uploading', async () => {
    const dest = `docker://${registry.host}/shoal/synthetic:v1`
    // Signed at the same time for the same name: the signature is the same bytes too (ed25519 is deterministic).
    const again = await convertImage({ source: `oci:${src}:gzip`, dest, signingKey: keys.privateKey, destRegistry: plain, signing: sameSignature })
    const total = again.push!.blobs.present
    assert.deepEqual(again.push!.blobs, { present: total, mounted: 0, uploaded: 0 })
    assert.equal(again.push!.uploadedBytes, 0)

    await convertImage({ source: `oci:${src}:gzip`, dest: `oci:${join(dir, 'to-push')}:v1`, signingKey: keys.privateKey, signing: sameSignature })
    const layout = await OciLayout.open(join(dir, 'to-push'))
    const mounted = await pushToRegistry(layout, 'v1', `docker://${registry.host}/team/copy:v1`, { access: plain, mountFrom: ['library/absent', 'shoal/synthetic'] })
    assert.deepEqual(mounted.blobs, { present: 0, mounted: total, uploaded: 0 })
    const uploaded = await pushToRegistry(layout, 'v1', `docker://${registry.host}/team/fresh`, { access: plain })
    assert.deepEqual(uploaded.blobs, { present: 0, mounted: 0, uploaded: total })
    assert.equal(uploaded.dest, `docker://${registry.host}/team/fresh:latest`)
    for (const repo of ['team/copy', 'team/fresh']) {
      const origin = await RegistryOrigin.open(`docker://${registry.host}/${repo}`, plain)
      const tag = repo === 'team/copy' ? 'v1' : 'latest'
      assert.equal((await verifyImage(origin, tag, { trusted: [keys.publicKey], workDir: join(dir, `verify-${repo.replace('/', '-')}`) })).manifestDigest, mounted.manifestDigest)
    }
    await assert.rejects(pushToRegistry(layout, 'v1', `docker://${registry.host}/team/x@${mounted.manifestDigest}`, { access: plain }), /name a tag, not a digest/)
  })

  test('shoal sign re-signs an image in a registry in place: only the signature changes', async () => {
    const origin = await RegistryOrigin.open(`docker://${registry.host}/shoal/synthetic`, plain)
    const before = await loadImage(origin, 'v1', { trusted: [keys.publicKey] })
    const report = await signImage(`docker://${registry.host}/shoal/synthetic:v1`, keys.privateKey, { lifetimeMs: 7 * 86_400_000, access: plain })
    assert.equal(report.replaced, 'v2')
    assert.deepEqual(report.names, ['shoal/synthetic:v1'])
    assert.ok(report.version > before.signature!.version)
    const after = await loadImage(origin, 'v1', { trusted: [keys.publicKey], expectName: 'shoal/synthetic:v1' })
    assert.equal(after.manifestDigest, before.manifestDigest)
    assert.equal(after.manifest.config.digest, before.manifest.config.digest)
    assert.equal(after.signature!.version, report.version)
    assert.ok(Math.abs(Date.parse(after.signature!.expires!) - Date.now() - 7 * 86_400_000) < 60_000)
  })

  test('chunked uploads, exact ranges, and HTTPS unless told otherwise', async () => {
    const client = await openRegistryClient(registry.host, 'chunked', plain, { uploadChunkBytes: 256 << 10 })
    const data = bytes((1 << 20) + 12345, 9)
    const file = join(dir, 'chunked.bin')
    await writeFile(file, data)
    const desc = { mediaType: 'application/octet-stream', digest: sha256(data), size: data.length }
    const open = (start: number, end: number): Readable => createReadStream(file, { start, end: end - 1 })
    const before = client.stats.requests
    assert.equal(await client.pushBlob('chunked', desc, { open }), 'uploaded')
    assert.equal(client.stats.requests - before, 1 + 1 + 5 + 1, 'HEAD, POST, 5 PATCHes of 256 KiB or less, PUT')
    assert.equal(await client.pushBlob('chunked', desc, { open }), 'present')
    assert.equal(await client.blobSize('chunked', desc.digest), data.length)
    assert.deepEqual(await client.getBlob('chunked', desc.digest), data)
    assert.deepEqual(await client.getBlobRange('chunked', desc.digest, 300_000, 500_000), data.subarray(300_000, 800_000))
    await assert.rejects(client.getBlobRange('chunked', desc.digest, data.length - 10, 20), (err: unknown) => err instanceof OriginError && !err.retryable && /past the end of the blob \(size 1060921\)/.test(err.message))
    client.close()

    const https = new RegistryClient({ registry: registry.host })
    await assert.rejects(https.resolveManifest('synthetic', 'gzip'), (err: unknown) => err instanceof OriginError && !err.retryable && /TLS handshake failed, the server does not speak TLS; if the registry is plain HTTP, say so with --plain-http/.test(err.message))
  })

  test('a registry that redirects blob downloads to storage: followed, and the storage never sees the credentials', async () => {
    const rdir = join(dir, 'redirecting')
    const htpasswd = await makeHtpasswd(dir, 'dora', 'pw')
    const storage = await startStorageServer(join(rdir, 'storage'))
    let redirecting: TestRegistry | undefined
    try {
      redirecting = await startRegistry({ dir: rdir, htpasswd, redirectTo: storage.url })
      await skopeoCopy(`oci:${src}:zstd`, `docker://${redirecting.host}/synthetic:zstd`, { creds: 'dora:pw' })
      const access = { plainHttp: true, credentials: 'dora:pw' }
      const pulled = await convertImage({ source: `docker://${redirecting.host}/synthetic:zstd`, dest: `oci:${join(dir, 'via-redirect')}:z`, signingKey: keys.privateKey, sourceRegistry: access })
      const direct = await convertImage({ source: `oci:${src}:zstd`, dest: `oci:${join(dir, 'direct')}:z`, signingKey: keys.privateKey })
      assert.deepEqual(catalogs(pulled), catalogs(direct))

      await convertImage({ source: `oci:${src}:zstd`, dest: `docker://${redirecting.host}/shoal:z`, signingKey: keys.privateKey, destRegistry: access })
      const origin = await RegistryOrigin.open(`docker://${redirecting.host}/shoal`, access)
      const image = await origin.resolve('z')
      const manifest = JSON.parse(Buffer.from(await origin.getBlob(image.digest)).toString()) as ImageManifest
      const config = parseShoalConfig(await origin.getBlob(manifest.config.digest))
      const pack = config.layers[0]!.packs[0]!
      assert.equal((await origin.getRange(pack.digest, 100, 1000)).length, 1000)

      const blobRequests = storage.seen.length
      assert.ok(blobRequests >= 5, `${blobRequests} requests reached the storage`)
      assert.deepEqual(storage.seen.filter(h => h.authorization !== undefined), [])
      assert.ok(storage.seen.some(h => h.range === 'bytes=100-1099'))
    } finally {
      await redirecting?.stop()
      await storage.close()
    }
  })
})
