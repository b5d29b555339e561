import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { convertImage } from '../../src/convert/convert.ts'
import { FormatError, IntegrityError } from '../../src/errors.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { standardSyntheticLayers, expectedMergedPaths } from '../helpers/standard-layers.ts'
import { buildSyntheticImage, type SyntheticEntry } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk, snapshotView } from '../helpers/tree-snapshot.ts'
import { umociUnpack } from '../helpers/umoci.ts'

const keys = generateKeyPairSync('ed25519')

async function convertAndView (src: string, destDir: string, tag = 'img') {
  const report = await convertImage({ source: src, dest: `oci:${destDir}:${tag}`, signingKey: keys.privateKey })
  const origin = await DirOrigin.open(destDir)
  const opened = await openImageView(origin, tag, { trusted: [keys.publicKey], catalogDir: join(destDir, '..', `catalogs-${tag}`) })
  return { report, origin, ...opened }
}

describe('convert: synthetic images against umoci unpack', () => {
  for (const compression of ['gzip', 'zstd', 'none'] as const) {
    it(`merged view equals umoci's unpacked tree (${compression} layers)`, async () => {
      const dir = await tempDir()
      const src = await buildSyntheticImage(join(dir, 'src'), compression, standardSyntheticLayers(), { compression })
      // umoci 0.4.7 reads no zstd layers: its reference tree comes from the same layers gzipped.
      const reference = compression === 'zstd' ? await buildSyntheticImage(join(dir, 'src'), 'gzip', standardSyntheticLayers()) : src
      const { origin, view, close } = await convertAndView(src.ref, join(dir, 'dest'))
      try {
        await umociUnpack(reference.ref.replace(/^oci:/, ''), join(dir, 'bundle'))
        const expected = await snapshotDisk(join(dir, 'bundle', 'rootfs'), { mtimes: true })
        const actual = await snapshotView(view, origin, { mtimes: true })
        assert.deepEqual(diffSnapshots(expected, actual), [])
        // Preloaded, a catalog answers every listing from one query over all its entries: the same tree.
        for (const catalog of view.catalogs) assert.ok(catalog.preload(64 << 20) > 0)
        assert.deepEqual(diffSnapshots(expected, await snapshotView(view, origin, { mtimes: true })), [])
        // The helper's own expectation covers what a disk tree cannot show (e.g. hidden paths).
        for (const [path, node] of expectedMergedPaths) {
          assert.ok(actual.has(path), `${path} should be in the merged view`)
          assert.equal(actual.get(path)!.type, node.type, path)
        }
      } finally {
        close()
      }
    })
  }

  it('shows a lower layer\'s attributes for a directory an upper layer only implies', async () => {
    const dir = await tempDir()
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [
      [{ type: 'dir', path: 'srv', mode: 0o750, uid: 1000, gid: 1000 }, { type: 'file', path: 'srv/a', content: 'a' }],
      [{ type: 'file', path: 'srv/b', content: 'b' }, { type: 'file', path: 'new/deep/c', content: 'c' }]
    ])
    const { view, close } = await convertAndView(src.ref, join(dir, 'dest'))
    try {
      const srv = view.resolve('/srv')!.inode
      assert.deepEqual([srv.mode & 0o7777, srv.uid, srv.gid], [0o750, 1000, 1000])
      assert.deepEqual(view.readdir(view.resolve('/srv')!).map(e => e.name), ['a', 'b'])
      const implied = view.resolve('/new/deep')!.inode
      assert.deepEqual([implied.mode & 0o7777, implied.uid], [0o755, 0], 'a directory no layer declares is 0755 root')
    } finally { close() }
  })

  it('keeps binary xattrs byte-exact (security.capability)', async () => {
    const dir = await tempDir()
    const cap = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0xff, 0xfe, 0x80, 0x00])
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'file', path: 'bin/ping', content: 'x', xattrs: { 'security.capability': cap } }]])
    const { view, close } = await convertAndView(src.ref, join(dir, 'dest'))
    try {
      assert.deepEqual(view.xattrs(view.resolve('/bin/ping')!).get('security.capability'), cap)
    } finally { close() }
  })

  it('is deterministic: the same source gives the same manifest digest', async () => {
    const dir = await tempDir()
    const src = await buildSyntheticImage(join(dir, 'src'), 'std', standardSyntheticLayers())
    const a = await convertImage({ source: src.ref, dest: `oci:${join(dir, 'a')}:x`, signingKey: keys.privateKey })
    const b = await convertImage({ source: src.ref, dest: `oci:${join(dir, 'b')}:x`, signingKey: keys.privateKey })
    assert.equal(a.manifestDigest, b.manifestDigest)
  })

  it('reuses chunks of images already in the destination and reports them', async () => {
    const dir = await tempDir()
    const base: SyntheticEntry[] = [{ type: 'file', path: 'usr/lib/big', content: { size: 3 << 20, seed: 'base' } }, { type: 'file', path: 'etc/os', content: 'debian' }]
    const a = await buildSyntheticImage(join(dir, 'src'), 'a', [base, [{ type: 'file', path: 'opt/a', content: { size: 1 << 20, seed: 'a' } }]])
    const b = await buildSyntheticImage(join(dir, 'src'), 'b', [base, [{ type: 'file', path: 'opt/b', content: { size: 1 << 20, seed: 'b' } }, { type: 'file', path: 'opt/copy-of-big', content: { size: 3 << 20, seed: 'base' } }]])
    const dest = join(dir, 'dest')
    const ra = await convertImage({ source: a.ref, dest: `oci:${dest}:a`, signingKey: keys.privateKey })
    assert.equal(ra.layers[0]!.sharedWithExisting.chunks, 0)
    const blobsBefore = (await readdir(join(dest, 'blobs', 'sha256'))).length
    const rb = await convertImage({ source: b.ref, dest: `oci:${dest}:b`, signingKey: keys.privateKey })
    // The whole base layer (3 chunks of big + 1 of etc/os) and the copy in the upper layer are shared.
    assert.equal(rb.layers[0]!.sharedWithExisting.chunks, 4)
    assert.equal(rb.layers[0]!.written.chunks, 0)
    assert.equal(rb.layers[1]!.sharedWithExisting.chunks, 3)
    assert.equal(rb.layers[1]!.written.chunks, 1)
    assert.equal(ra.layers[0]!.catalog, rb.layers[0]!.catalog, 'the shared layer converts to the same catalog blob')
    // New blobs: one pack, one catalog for layer 1, config, manifest, signature envelope and manifest.
    assert.equal((await readdir(join(dest, 'blobs', 'sha256'))).length - blobsBefore, 6)
  })
})

describe('convert: hostile and broken input', () => {
  async function convertEntries (entries: SyntheticEntry[]) {
    const dir = await tempDir()
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [entries])
    return await convertAndView(src.ref, join(dir, 'dest'))
  }

  it('confines ../ and absolute member names to the image root', async () => {
    const { view, close } = await convertEntries([
      { type: 'raw', header: { name: '../../etc/escaped', type: 'file', size: 3, mode: 0o644 }, body: Buffer.from('one') },
      { type: 'raw', header: { name: '/abs/file', type: 'file', size: 3, mode: 0o644 }, body: Buffer.from('two') },
      { type: 'raw', header: { name: 'a/../../../b', type: 'file', size: 5, mode: 0o644 }, body: Buffer.from('three') }
    ])
    try {
      const paths = [...view.walk()].map(([p]) => p)
      assert.deepEqual(paths.sort(), ['/', '/abs', '/abs/file', '/b', '/etc', '/etc/escaped'])
    } finally { close() }
  })

  it('stores symlinks that point outside verbatim and never follows them', async () => {
    const { view, close } = await convertEntries([
      { type: 'symlink', path: 'evil', target: '../../../../etc/shadow' },
      { type: 'symlink', path: 'dir-link', target: '/' },
      { type: 'file', path: 'dir-link/through', content: 'x' }
    ])
    try {
      assert.equal(view.resolve('/evil')!.inode.target, '../../../../etc/shadow')
      // A member "through" a symlink is a path in the image, not a write through the link:
      // tar would replace the link with a directory, and so does the converter.
      assert.equal(view.resolve('/dir-link')!.dirs.length, 1)
      assert.ok(view.resolve('/dir-link/through'))
    } finally { close() }
  })

  it('lets the later of duplicate members win', async () => {
    const { origin, view, close } = await convertEntries([
      { type: 'file', path: 'etc/conf', content: 'first' },
      { type: 'file', path: 'etc/conf', content: 'second', mode: 0o600 },
      { type: 'dir', path: 'd', mode: 0o700 },
      { type: 'file', path: 'd/kept', content: 'k' },
      { type: 'dir', path: 'd', mode: 0o755 }
    ])
    try {
      const snap = await snapshotView(view, origin)
      assert.equal(snap.get('/etc/conf')!.mode, 0o600)
      assert.equal(snap.get('/etc/conf')!.size, 6)
      assert.equal(snap.get('/d')!.mode, 0o755)
      assert.ok(snap.has('/d/kept'), 'a directory member over a directory keeps its children')
    } finally { close() }
  })

  it('refuses a hard link to a missing target with a clear error, and writes nothing', async () => {
    const dir = await tempDir()
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'hardlink', path: 'a', target: 'nowhere' }]])
    const dest = join(dir, 'dest')
    await assert.rejects(convertImage({ source: src.ref, dest: `oci:${dest}:t`, signingKey: keys.privateKey }),
      (err: Error) => err instanceof FormatError && /hard link "a" points to "nowhere"/.test(err.message))
    await assertNothingTagged(dest)
  })

  it('reports a truncated layer as truncated', async () => {
    const dir = await tempDir()
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [{ entries: [{ type: 'file', path: 'big', content: { size: 200000, seed: 's' } }], truncateAt: 100000 }])
    const dest = join(dir, 'dest')
    await assert.rejects(convertImage({ source: src.ref, dest: `oci:${dest}:t`, signingKey: keys.privateKey }),
      (err: Error) => err instanceof FormatError && /truncated/.test(err.message))
    await assertNothingTagged(dest)
  })

  it('refuses layers whose digest or diff_id is wrong', async () => {
    for (const option of ['corruptDiffId', 'corruptLayerDigest'] as const) {
      const dir = await tempDir()
      const src = await buildSyntheticImage(join(dir, 'src'), 't', standardSyntheticLayers(), { [option]: true })
      const dest = join(dir, 'dest')
      await assert.rejects(convertImage({ source: src.ref, dest: `oci:${dest}:t`, signingKey: keys.privateKey }),
        (err: Error) => (err instanceof IntegrityError || err instanceof FormatError) && /corrupt/.test(err.message), option)
      await assertNothingTagged(dest)
    }
  })
})

/** After a failed conversion the destination has no tag and no temp files. */
async function assertNothingTagged (dest: string): Promise<void> {
  const layout = await OciLayout.open(dest)
  assert.equal((await layout.tags()).size, 0)
  const leftovers = (await readdir(join(dest, 'blobs'))).filter(n => n.startsWith('.tmp-'))
  assert.deepEqual(leftovers, [])
}
