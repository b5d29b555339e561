/**
 * LazyLayers against a real registry (docker-registry): a synthetic image pushed with
 * skopeo and converted registry to registry, then asked for its layers the way the
 * snapshotter asks on containerd's Prepare. Every way a layer cannot go lazy must be
 * a fallback with its reason, never an error; the right labels mount the layer.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { chainId, CRI_LABELS, LazyLayers, type LazyLayerParts } from '../../src/agent/lazy-layers.ts'
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { OriginChunkSource } from '../../src/fetch/chunk-source.ts'
import { ChunkResolver } from '../../src/fetch/resolver.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { generateKeys, loadPrivateKey, loadPublicKey } from '../../src/format/signing.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { sha256 } from '../../src/oci/digest.ts'
import { parseShoalConfig } from '../../src/format/image-config.ts'
import { loadImage } from '../../src/image/load-image.ts'
import { RollbackGuard } from '../../src/image/rollback-guard.ts'
import { writeSignedImage } from '../../src/image/write-image.ts'
import { RegistryOrigin } from '../../src/origin/registry-origin.ts'
import { conversionTag } from '../../src/oci/conversion-tags.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import type { ImageManifest } from '../../src/oci/types.ts'
import { pushToRegistry } from '../../src/registry/push.ts'
import { RangeReader } from '../../src/origin/range-reader.ts'
import { RoutedOrigin } from '../../src/origin/routed-origin.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { buildSyntheticImage, type SyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { freePort, skopeoCopy, startRegistry, type TestRegistry } from '../registry/helpers.ts'

const execFileAsync = promisify(execFile)
const dir = await tempDir('shoal-lazy-')

describe('LazyLayers (the snapshotter\'s remote layers)', () => {
  let registry: TestRegistry
  let image: SyntheticImage
  let lazy: LazyLayers
  let parts: LazyLayerParts
  let disk: DiskCache

  before(async () => {
    registry = await startRegistry({ dir: join(dir, 'registry') })
    image = await buildSyntheticImage(join(dir, 'src'), 'app', standardSyntheticLayers())
    await skopeoCopy(image.ref, `docker://${registry.host}/team/app:1`)
    await generateKeys(join(dir, 'keys'))
    await execFileAsync(SHOAL_BIN, ['convert', `docker://${registry.host}/team/app:1`, `docker://${registry.host}/team/app:1-shoal`, '--key', join(dir, 'keys', 'shoal.key'), '--plain-http'])
    const origin = new RoutedOrigin()
    disk = await DiskCache.open({ dir: join(dir, 'cache'), maxBytes: 1 << 30 })
    const resolver = new ChunkResolver({ disk, remote: [new OriginChunkSource(new RangeReader({ origin }))], timeoutMs: 10_000 })
    parts = {
      trusted: [await loadPublicKey(join(dir, 'keys', 'shoal.pub'))],
      catalogDir: join(dir, 'catalogs'),
      registry: {},
      origin,
      resolver,
      fetchBlob: async (blob, signal) => await resolver.get({ digest: blob.digest, length: blob.size, pack: blob.digest, packOffset: 0, storedLength: blob.size, codec: 0 }, { signal: signal ?? AbortSignal.timeout(10_000) }),
      joinSwarm: () => {},
      catalogAdded: async () => {},
      log: { debug () {}, info () {}, warn () {}, error () {} }
    }
    lazy = new LazyLayers(parts)
  })
  after(async () => {
    await disk?.close()
    await registry?.stop()
  })

  /** What containerd's CRI plugin asks for layer I of the image. */
  const request = (i: number, overrides: Partial<Record<'image' | 'manifest' | 'layer' | 'target', string>> = {}): Parameters<LazyLayers['prepare']>[0] => ({
    key: `k8s.io/1/extract-${i}`,
    parent: '',
    target: overrides.target ?? chainId(image.diffIds.slice(0, i + 1)),
    dir: join(dir, `layer-${i}-${Math.random().toString(36).slice(2)}`),
    labels: {
      'containerd.io/snapshot.ref': overrides.target ?? chainId(image.diffIds.slice(0, i + 1)),
      [CRI_LABELS.imageRef]: overrides.image ?? `${registry.host}/team/app:1`,
      [CRI_LABELS.manifestDigest]: overrides.manifest ?? image.manifestDigest,
      [CRI_LABELS.layerDigest]: overrides.layer ?? image.layerDigests[i]!
    }
  })

  async function fallsBack (req: Parameters<LazyLayers['prepare']>[0], reason: string): Promise<void> {
    const before = lazy.stats().fallbacks[reason as 'error'] ?? 0
    assert.equal(await lazy.prepare(req), undefined)
    assert.equal(lazy.stats().fallbacks[reason as 'error'], before + 1, JSON.stringify(lazy.stats()))
  }

  it('mounts a layer found by the digest tag, as an overlay lower directory', async () => {
    const req = request(1)
    const layer = await lazy.prepare(req)
    assert.ok(layer !== undefined, JSON.stringify(lazy.stats()))
    try {
      assert.equal(await readFile(join(req.dir, 'opt', 'app', 'new.txt'), 'utf8').then(t => t.length > 0), true)
      assert.equal(lazy.stats().mounted, 1)
    } finally {
      await lazy.release(req.dir)
    }
    assert.equal(lazy.stats().mounted, 0)
  })

  it('falls back without CRI labels', async () => {
    const req = request(0)
    req.labels = { 'containerd.io/snapshot.ref': req.target }
    await fallsBack(req, 'no-image-labels')
  })

  it('falls back when the image has no conversion', async () => {
    await fallsBack(request(0, { manifest: `sha256:${'ab'.repeat(32)}` }), 'no-conversion')
  })

  it('falls back when the chainID containerd asks for is not the conversion\'s', async () => {
    await fallsBack(request(1, { target: image.diffIds[1]! }), 'chain-mismatch')
  })

  it('falls back when the conversion has no layer made from that blob', async () => {
    await fallsBack(request(0, { layer: `sha256:${'cd'.repeat(32)}` }), 'layer-not-converted')
  })

  it('refuses a digest tag that points to the conversion of another image (tag substitution)', async () => {
    // Someone with push access tags the app's conversion as the conversion of another manifest.
    const other = `sha256:${'ef'.repeat(32)}` as Digest
    const accept = { accept: 'application/vnd.oci.image.manifest.v1+json' }
    const res = await fetch(`${registry.url}/v2/team/app/manifests/1-shoal`, { headers: accept })
    const body = Buffer.from(await res.arrayBuffer())
    const put = await fetch(`${registry.url}/v2/team/app/manifests/${conversionTag(other)}`, { method: 'PUT', headers: { 'content-type': res.headers.get('content-type')! }, body })
    assert.equal(put.status, 201)
    await fallsBack(request(0, { manifest: other }), 'invalid-conversion')
  })

  it('fetches a traced conversion\'s prefetch list, for every layer, from the first Prepare on', async () => {
    // A conversion with a prefetch list, as `shoal trace` writes it, pushed beside its own copy of the image.
    await skopeoCopy(image.ref, `docker://${registry.host}/team/traced:1`)
    const layout = join(dir, 'traced')
    await convertImage({ source: image.ref, dest: `oci:${layout}:app`, signingKey: await loadPrivateKey(join(dir, 'keys', 'shoal.key')) })
    const oci = await OciLayout.open(layout)
    const manifest = await oci.readJson<ImageManifest>((await oci.resolveTag('app')).digest, 'manifest')
    const config = parseShoalConfig(await oci.readBlob(manifest.config.digest, 'config'))
    // Signed for the name the pods use (as `shoal convert --name team/traced:1`, then `shoal trace`, would).
    await writeSignedImage(oci, 'app', { ...config, prefetch: [{ path: '/var/cache/old/fresh.txt' }, { path: '/etc/os-release' }] }, await loadPrivateKey(join(dir, 'keys', 'shoal.key')), { names: ['team/traced:1'] })
    await pushToRegistry(oci, 'app', `docker://${registry.host}/team/traced:1-shoal`, { access: { plainHttp: true } })

    // Layer 3's file, though only layer 0 is prepared: the list names paths of the whole image.
    const wanted = [sha256(Buffer.from('recreated after the whiteout\n'))]
    assert.ok(!disk.has(wanted[0]!))
    const req = request(0, { image: `${registry.host}/team/traced:1` })
    const layer = await lazy.prepare(req)
    assert.ok(layer !== undefined, JSON.stringify(lazy.stats()))
    try {
      const deadline = Date.now() + 10_000
      while (!wanted.every(d => disk.has(d))) {
        assert.ok(Date.now() < deadline, 'the prefetch list was not fetched within 10 s')
        await new Promise(resolve => setTimeout(resolve, 50))
      }
    } finally {
      await lazy.release(req.dir)
    }
  })

  it('falls back when the conversion is signed for another repository:tag than the pod\'s image (tag substitution)', async () => {
    // team/app:2 (or any name) pointed at app:1's manifest: the conversion is signed for team/app:1 and team/app:1-shoal only.
    await fallsBack(request(0, { image: `${registry.host}/team/app:2` }), 'signature')
    // team/traced holds a conversion of the same manifest (the test above), signed for team/traced:1 only.
    await fallsBack(request(0, { image: `${registry.host}/team/traced:2` }), 'signature')
    // The same request under the name it was signed for, through another registry host name (a mirror): lazy.
    const req = request(0, { image: `localhost:${registry.host.split(':')[1]!}/team/app:1` })
    assert.ok(await lazy.prepare(req) !== undefined, JSON.stringify(lazy.stats()))
    await lazy.release(req.dir)
  })

  it('falls back with reason rollback when the node saw a newer version of the name', async () => {
    const guard = new RollbackGuard(join(dir, 'versions.json'))
    const guarded = new LazyLayers({ ...parts, guard })
    const conversion = await loadImage(await RegistryOrigin.open(`docker://${registry.host}/team/app`, { plainHttp: true }), '1-shoal', { trusted: parts.trusted })
    // Unseen: accepted, and recorded.
    const first = request(0)
    assert.ok(await guarded.prepare(first) !== undefined)
    await guarded.release(first.dir)
    assert.equal((await guard.seen('team/app:1'))?.version, conversion.signature!.version)
    // This node has since seen a newer version of team/app:1: the tag now pointing back at this one is a rollback.
    const newer = new LazyLayers({ ...parts, guard })
    await writeFile(guard.path, JSON.stringify({ schemaVersion: 1, names: { 'team/app:1': { version: conversion.signature!.version + 1, manifest: `sha256:${'9'.repeat(64)}`, seenAt: new Date().toISOString() } } }))
    assert.equal(await newer.prepare(request(0)), undefined)
    assert.equal(newer.stats().fallbacks.rollback, 1, JSON.stringify(newer.stats()))
  })

  it('falls back, within its bound, when the registry is unreachable', async () => {
    const started = Date.now()
    await fallsBack(request(0, { image: `127.0.0.1:${await freePort()}/team/app:1` }), 'unreachable')
    assert.ok(Date.now() - started < 30_000)
  })
})
