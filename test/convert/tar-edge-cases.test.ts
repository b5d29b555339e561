import assert from 'node:assert/strict'
import { createHash, generateKeyPairSync } from 'node:crypto'
import { mkdir, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { convertImage } from '../../src/convert/convert.ts'
import { FormatError, IntegrityError } from '../../src/errors.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { inspectImage } from '../../src/image/inspect-image.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { runTool } from '../helpers/exec.ts'
import { buildImageFromTars, deepPathEntries, entryWithRawName, rewriteManifest, unpaddedLayerTar } from '../helpers/raw-layers.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { buildSyntheticImage, generatedBytes, layerTar, type SyntheticEntry } from '../helpers/synthetic.ts'
import { END_OF_ARCHIVE, encodeEntry } from '../helpers/tar.ts'
import { tempDir } from '../helpers/tmp.ts'
import { snapshotView } from '../helpers/tree-snapshot.ts'

const keys = generateKeyPairSync('ed25519')

async function convert (src: string, dest: string, tag = 't') {
  return await convertImage({ source: src, dest: `oci:${dest}:${tag}`, signingKey: keys.privateKey })
}

async function openView (dest: string, tag = 't') {
  const origin = await DirOrigin.open(dest)
  const opened = await openImageView(origin, tag, { trusted: [keys.publicKey], catalogDir: join(dest, '..', `catalogs-${tag}`) })
  return { origin, ...opened }
}

async function blobNames (dir: string): Promise<string[]> {
  try { return (await readdir(join(dir, 'blobs', 'sha256'))).sort() } catch { return [] }
}

/** The contents of every regular file of the merged view, by path. */
async function fileContents (dest: string, tag = 't'): Promise<Map<string, string>> {
  const { origin, view, close } = await openView(dest, tag)
  try {
    const snap = await snapshotView(view, origin)
    return new Map([...snap].filter(([, f]) => f.type === 'file').map(([p, f]) => [p, f.sha256!]))
  } finally { close() }
}

const sha = (data: Buffer | string): string => createHash('sha256').update(data).digest('hex')

describe('convert: names that are not UTF-8', () => {
  it('refuses the layer, naming it and the path hex-escaped, instead of merging caf\\xe9 and caf\\xff', async () => {
    const dir = await tempDir()
    const tar = Buffer.concat([
      entryWithRawName(Buffer.from('caf\xe9', 'latin1'), 'file', Buffer.from('first')),
      entryWithRawName(Buffer.from('caf\xff', 'latin1'), 'file', Buffer.from('second')),
      END_OF_ARCHIVE
    ])
    const ok = layerTar([{ type: 'file', path: 'fine', content: 'x' }])
    const src = await buildImageFromTars(join(dir, 'src'), 't', [ok, tar])
    const dest = join(dir, 'dest')
    await assert.rejects(convert(src.ref, dest), (err: Error) => {
      assert.ok(err instanceof FormatError, String(err))
      assert.match(err.message, new RegExp(`layer 1 \\(${src.layerDigests[1]}\\)`))
      assert.match(err.message, /"caf\\xe9"/)
      assert.match(err.message, /not valid UTF-8/)
      return true
    })
    assert.deepEqual((await OciLayout.open(dest).then(l => l.tags())).size, 0)
  })

  it('refuses a non-UTF-8 name carried in a pax path record (Go archive/tar) or a GNU long name', async () => {
    const name = Buffer.from('dir/caf\xe9', 'latin1')
    for (const tar of [
      Buffer.concat([encodeEntry({ name: 'placeholder', type: 'file', pax: { path: name } }, Buffer.from('x')), END_OF_ARCHIVE]),
      Buffer.concat([encodeEntry({ name: '././@LongLink', type: 'gnu-long-path' }, Buffer.concat([name, Buffer.alloc(1)])), encodeEntry({ name: 'placeholder', type: 'file' }, Buffer.from('x')), END_OF_ARCHIVE])
    ]) {
      const dir = await tempDir()
      const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
      await assert.rejects(convert(src.ref, join(dir, 'dest')), (err: Error) => err instanceof FormatError && /"dir\/caf\\xe9"/.test(err.message) && /layer 0/.test(err.message))
    }
  })

  it('refuses a symlink target and a hard link target that are not UTF-8', async () => {
    for (const tar of [
      Buffer.concat([entryWithRawName(Buffer.from('link'), 'symlink', undefined, Buffer.from('caf\xe9', 'latin1')), END_OF_ARCHIVE]),
      Buffer.concat([encodeEntry({ name: 'x', type: 'link', pax: { linkpath: Buffer.from('caf\xe9', 'latin1') } }), END_OF_ARCHIVE])
    ]) {
      const dir = await tempDir()
      const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
      await assert.rejects(convert(src.ref, join(dir, 'dest')), (err: Error) => err instanceof FormatError && /"caf\\xe9"/.test(err.message) && /not valid UTF-8/.test(err.message))
    }
  })

  it('refuses an xattr name that is not UTF-8', async () => {
    const dir = await tempDir()
    const tar = Buffer.concat([encodeEntry({ name: 'f', type: 'file', pax: { 'SCHILY.xattr.user.caf\xe9': Buffer.from('v') } }), END_OF_ARCHIVE])
    // encodeEntry writes keys as UTF-8: turn the two bytes of é into \xe9\xe9 (same record length).
    const bad = Buffer.from(tar.toString('latin1').replace('user.caf\xc3\xa9', 'user.caf\xe9\xe9'), 'latin1')
    const src = await buildImageFromTars(join(dir, 'src'), 't', [bad])
    await assert.rejects(convert(src.ref, join(dir, 'dest')), (err: Error) => err instanceof FormatError && /xattr name "user\.caf\\xe9\\xe9"/.test(err.message))
  })

  it('keeps UTF-8 names byte-exact whether they come raw in the ustar header or in a pax record', async () => {
    const dir = await tempDir()
    const tar = Buffer.concat([
      entryWithRawName(Buffer.from('café'), 'file', Buffer.from('ustar')),
      entryWithRawName(Buffer.from('\ufeffbom'), 'file', Buffer.from('bom')),
      encodeEntry({ name: '././@LongLink', type: 'gnu-long-path' }, Buffer.from('gnu-long-ñame\0')),
      encodeEntry({ name: 'placeholder', type: 'file' }, Buffer.from('gnu')),
      encodeEntry({ name: 'dir/naïve-ünïcödé-名前', type: 'file' }, Buffer.from('pax')),
      entryWithRawName(Buffer.from('sym'), 'symlink', undefined, Buffer.from('café')),
      encodeEntry({ name: 'hard', type: 'link', linkname: 'dir/naïve-ünïcödé-名前' }),
      encodeEntry({ name: 'x', type: 'file', pax: { 'SCHILY.xattr.user.ключ': Buffer.from([0xff, 0x00]) } }),
      END_OF_ARCHIVE
    ])
    const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
    const dest = join(dir, 'dest')
    await convert(src.ref, dest)
    const { view, close } = await openView(dest)
    try {
      const paths = [...view.walk()].map(([p]) => p).sort()
      assert.deepEqual(paths, ['/', '/café', '/dir', '/dir/naïve-ünïcödé-名前', '/gnu-long-ñame', '/hard', '/sym', '/x', '/\ufeffbom'])
      assert.equal(view.resolve('/sym')!.inode.target, 'café')
      assert.equal(view.resolve('/hard')!.inode.nlink, 2)
      assert.deepEqual(view.xattrs(view.resolve('/x')!).get('user.ключ'), Buffer.from([0xff, 0x00]))
    } finally { close() }
  })
})

describe('convert: very deep paths', () => {
  for (const depth of [4000, 10000]) {
    it(`converts, verifies and walks a path ${depth} directories deep`, async () => {
      const dir = await tempDir()
      // Layer 0 also replaces the whole deep tree with a file, and then makes it again.
      const src = await buildSyntheticImage(join(dir, 'src'), 't', [
        [...deepPathEntries(depth), { type: 'file', path: 'd', content: 'replaced' }, ...deepPathEntries(depth)],
        [{ type: 'whiteout', path: 'd' }],
        [...deepPathEntries(depth), { type: 'dir', path: 'd' }]
      ])
      const dest = join(dir, 'dest')
      await convert(src.ref, dest)
      const { view, close } = await openView(dest)
      try {
        const deepest = [...view.walk()].at(-1)!
        assert.equal(deepest[0].split('/').length, depth + 2)
        assert.ok(deepest[0].endsWith('/d/bottom'))
      } finally { close() }
      const origin = await DirOrigin.open(dest)
      const r = await verifyImage(origin, 't', { trusted: [keys.publicKey], workDir: join(dir, 'verify') })
      assert.equal(r.catalogs, 3)
      const summary = await inspectImage(origin, 't', { trusted: [keys.publicKey], workDir: join(dir, 'inspect') })
      assert.equal(summary.totals.files, 2)
    })
  }
})

describe('convert: what a failed conversion leaves behind', () => {
  it('removes the packs and catalogs it wrote when a layer\'s digest or diff_id is wrong, and keeps blobs that were there before', async () => {
    for (const option of ['corruptDiffId', 'corruptLayerDigest'] as const) {
      const dir = await tempDir()
      const dest = join(dir, 'dest')
      // An image already in the destination shares a file with the broken one.
      const shared: SyntheticEntry = { type: 'file', path: 'shared', content: { size: 300000, seed: 'shared' } }
      const earlier = await buildSyntheticImage(join(dir, 'earlier'), 'e', [[shared]])
      await convert(earlier.ref, dest, 'earlier')
      const before = await blobNames(dest)
      const tagsBefore = [...(await (await OciLayout.open(dest)).tags()).keys()]
      // Layer 0 is the broken one; its new file makes a pack before the digests are compared.
      const layers = [[shared, { type: 'file', path: 'new', content: { size: 200000, seed: 'new' } }] as SyntheticEntry[], ...standardSyntheticLayers()]
      // Uncompressed, the flipped byte lands in file data: the tar reads fine, packs are written, then the digest fails.
      const src = await buildSyntheticImage(join(dir, 'src'), 't', layers, { [option]: true, compression: 'none' })
      await assert.rejects(convert(src.ref, dest), (err: Error) => err instanceof IntegrityError && /corrupt/.test(err.message), option)
      assert.deepEqual(await blobNames(dest), before, `${option}: only the blobs that were there before remain`)
      assert.deepEqual([...(await (await OciLayout.open(dest)).tags()).keys()], tagsBefore)
      assert.deepEqual((await readdir(join(dest, 'blobs'))).filter(n => n.startsWith('.tmp-')), [])
    }
  })

  it('removes the blobs of the layers it converted before a later layer failed', async () => {
    const dir = await tempDir()
    const good = layerTar([{ type: 'file', path: 'a', content: { size: 300000, seed: 'a' } }])
    const bad = layerTar([{ type: 'file', path: 'b', content: { size: 200000, seed: 'b' } }]).subarray(0, 100000)
    const src = await buildImageFromTars(join(dir, 'src'), 't', [good, bad])
    const dest = join(dir, 'dest')
    await assert.rejects(convert(src.ref, dest), (err: Error) => err instanceof FormatError && /layer 1/.test(err.message) && /truncated/.test(err.message))
    assert.deepEqual(await blobNames(dest), [])
  })

  it('refuses a layer whose size in the manifest is wrong, like a wrong digest', async () => {
    for (const delta of [1, -1]) {
      const dir = await tempDir()
      const src = await buildSyntheticImage(join(dir, 'src'), 't', standardSyntheticLayers())
      await rewriteManifest(join(dir, 'src'), 't', m => { m.layers[1]!.size += delta })
      const dest = join(dir, 'dest')
      await assert.rejects(convert(src.ref, dest), (err: Error) => {
        assert.ok(err instanceof IntegrityError, String(err))
        assert.match(err.message, new RegExp(`layer 1 \\(${src.layerDigests[1]}\\)`))
        assert.match(err.message, /size/)
        assert.match(err.message, /the source image is corrupt/)
        return true
      }, `size ${delta > 0 ? '+' : ''}${delta}`)
      assert.deepEqual(await blobNames(dest), [])
    }
  })
})

describe('convert: how a layer tar may end (containerd\'s unpacker is the reference)', () => {
  const body = generatedBytes({ size: 1000, seed: 'last' })
  const entries: SyntheticEntry[] = [
    { type: 'dir', path: 'opt' },
    { type: 'file', path: 'opt/first', content: 'first file\n' },
    { type: 'file', path: 'opt/last', content: body }
  ]

  it('accepts a layer that ends right after its last file\'s data (umoci insert 0.4.7), with a note', async () => {
    for (const compression of ['gzip', 'zstd', 'none'] as const) {
      const dir = await tempDir()
      const tar = unpaddedLayerTar(entries)
      assert.equal(tar.length % 512, 1000 % 512)
      const src = await buildImageFromTars(join(dir, 'src'), 't', [layerTar([{ type: 'file', path: 'base', content: 'b' }]), tar], { compression })
      const dest = join(dir, 'dest')
      const report = await convert(src.ref, dest)
      assert.deepEqual(report.layers[0]!.notes, [])
      assert.ok(report.layers[1]!.notes.some(n => /without end-of-archive blocks/.test(n) && /padding/.test(n)), JSON.stringify(report.layers[1]!.notes))
      assert.deepEqual(await fileContents(dest), new Map([['/base', sha('b')], ['/opt/first', sha('first file\n')], ['/opt/last', sha(body)]]))
    }
  })

  it('accepts a layer that ends between members (no end-of-archive blocks) or inside the last padding, with a note', async () => {
    const members = Buffer.concat([encodeEntry({ name: 'opt/first', type: 'file' }, Buffer.from('first file\n')), encodeEntry({ name: 'opt/empty-dir/', type: 'directory' })])
    const padded = encodeEntry({ name: 'opt/last', type: 'file' }, body)
    for (const [what, tar, note] of [
      ['between members', members, /without end-of-archive blocks/],
      ['after one of the two end blocks', Buffer.concat([members, END_OF_ARCHIVE.subarray(0, 512)]), /one end-of-archive block/],
      ['inside the padding', Buffer.concat([members, padded.subarray(0, padded.length - 7)]), /padding/],
      // Many chunks keep the reader busy while the padding is already buffered.
      ['after the padding of a big last file', Buffer.concat([members, encodeEntry({ name: 'opt/big', type: 'file' }, generatedBytes({ size: (3 << 20) + 100, seed: 'big' }))]), /without end-of-archive blocks/],
      ['inside the padding of a big last file', Buffer.concat([members, encodeEntry({ name: 'opt/big', type: 'file' }, generatedBytes({ size: (3 << 20) + 100, seed: 'big' })).subarray(0, 512 + (3 << 20) + 200)]), /padding/]
    ] as const) {
      const dir = await tempDir()
      const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
      const dest = join(dir, 'dest')
      const report = await convert(src.ref, dest)
      assert.ok(report.layers[0]!.notes.some(n => note.test(n)), `${what}: ${JSON.stringify(report.layers[0]!.notes)}`)
      const files = await fileContents(dest)
      assert.equal(files.get('/opt/first'), sha('first file\n'), what)
    }
  })

  it('ignores what follows the end-of-archive blocks, as containerd does (still covered by the digest)', async () => {
    const dir = await tempDir()
    const tar = Buffer.concat([layerTar([{ type: 'file', path: 'kept', content: 'k' }]), Buffer.from('trailing garbage that is no tar header'.repeat(20)), encodeEntry({ name: 'hidden', type: 'file' }, Buffer.from('h'))])
    const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
    const dest = join(dir, 'dest')
    const report = await convert(src.ref, dest)
    assert.ok(report.layers[0]!.notes.some(n => /after the end-of-archive blocks/.test(n)), JSON.stringify(report.layers[0]!.notes))
    assert.deepEqual([...(await fileContents(dest)).keys()], ['/kept'])
  })

  it('reads no data after link, symlink, device and fifo headers whatever their size field says, as containerd does', async () => {
    const dir = await tempDir()
    const tar = Buffer.concat([
      encodeEntry({ name: 'target', type: 'file' }, Buffer.from('t')),
      encodeEntry({ name: 'sym', type: 'symlink', linkname: 'target', size: 700 }),
      encodeEntry({ name: 'hard', type: 'link', linkname: 'target', size: 1 }),
      encodeEntry({ name: 'fifo', type: 'fifo', size: 513 }),
      encodeEntry({ name: 'after', type: 'file' }, Buffer.from('after')),
      END_OF_ARCHIVE
    ])
    const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
    const dest = join(dir, 'dest')
    await convert(src.ref, dest)
    const { origin, view, close } = await openView(dest)
    try {
      const snap = await snapshotView(view, origin)
      assert.deepEqual([...snap.keys()].sort(), ['/', '/after', '/fifo', '/hard', '/sym', '/target'])
      assert.equal(snap.get('/sym')!.target, 'target')
      assert.equal(snap.get('/after')!.sha256, sha('after'))
    } finally { close() }
  })

  it('still refuses a stream cut inside a header, inside a pax record or inside a file\'s data', async () => {
    const first = encodeEntry({ name: 'opt/first', type: 'file' }, Buffer.from('first file\n'))
    const withPax = encodeEntry({ name: 'opt/x', type: 'file', pax: { 'SCHILY.xattr.user.k': 'v'.repeat(300) } }, body)
    for (const [what, tar] of [
      ['inside a header', Buffer.concat([first, withPax.subarray(0, 100)])],
      ['inside a whole zero-looking header', Buffer.concat([first, Buffer.alloc(300)])],
      ['inside a pax record', Buffer.concat([first, withPax.subarray(0, 512 + 100)])],
      ['inside the data', Buffer.concat([first, withPax.subarray(0, 1024 + 512 + 999)])],
      ['before the data', Buffer.concat([first, withPax.subarray(0, 1024 + 512)])]
    ] as const) {
      const dir = await tempDir()
      const src = await buildImageFromTars(join(dir, 'src'), 't', [tar])
      const dest = join(dir, 'dest')
      await assert.rejects(convert(src.ref, dest), (err: Error) => err instanceof FormatError && /layer 0 .* is truncated or corrupt/.test(err.message) && /the source image is damaged/.test(err.message), what)
      assert.deepEqual(await blobNames(dest), [], what)
    }
  })

  it('converts a layer written by the real umoci insert byte-exact', async () => {
    const dir = await tempDir()
    const layout = join(dir, 'src')
    await buildSyntheticImage(layout, 't', [[{ type: 'dir', path: 'opt' }, { type: 'file', path: 'opt/base', content: 'base\n' }]])
    const files = join(dir, 'files')
    await mkdir(join(files, 'tree', 'sub'), { recursive: true })
    const contents: Record<string, Buffer> = {
      'one.bin': generatedBytes({ size: 70001, seed: 'one' }),
      'tree/a': Buffer.from('a\n'),
      'tree/sub/b': generatedBytes({ size: 1537, seed: 'b' })
    }
    for (const [name, data] of Object.entries(contents)) await writeFile(join(files, name), data)
    await runTool('umoci', ['insert', '--image', `${layout}:t`, join(files, 'one.bin'), '/opt/one.bin'])
    await runTool('umoci', ['insert', '--image', `${layout}:t`, join(files, 'tree'), '/opt/tree'])
    const dest = join(dir, 'dest')
    const report = await convert(`oci:${layout}:t`, dest)
    assert.equal(report.layers.length, 3)
    // umoci 0.4.7 ends each inserted layer right after its last file's data.
    for (const layer of report.layers.slice(1)) assert.ok(layer.notes.some(n => /without end-of-archive blocks/.test(n)), JSON.stringify(layer.notes))
    assert.deepEqual(await fileContents(dest), new Map([
      ['/opt/base', sha('base\n')],
      ['/opt/one.bin', sha(contents['one.bin']!)],
      ['/opt/tree/a', sha(contents['tree/a']!)],
      ['/opt/tree/sub/b', sha(contents['tree/sub/b']!)]
    ]))
  })
})
