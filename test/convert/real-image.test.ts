import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk, snapshotView } from '../helpers/tree-snapshot.ts'

const keys = generateKeyPairSync('ed25519')

describe('convert: real Debian images (debootstrap + apt, built by scripts/fixtures/debian-images.ts)', () => {
  it('python image: the merged catalog view equals umoci unpack, content hashes included; perl shares the base', async () => {
    const fixtures = await ensureRealFixtures()
    const dir = await tempDir()
    const dest = join(dir, 'images')
    const python = await convertImage({ source: fixtures.ref('python'), dest: `oci:${dest}:python`, signingKey: keys.privateKey })
    assert.equal(python.layers.length, 2)

    const origin = await DirOrigin.open(dest)
    const { view, close } = await openImageView(origin, 'python', { trusted: [keys.publicKey], catalogDir: join(dir, 'catalogs') })
    try {
      const expected = await snapshotDisk(fixtures.unpacked.python, { mtimes: true })
      const actual = await snapshotView(view, origin, { mtimes: true })
      assert.ok(expected.size > 5000, `the reference tree has ${expected.size} paths`)
      assert.deepEqual(diffSnapshots(expected, actual), [])
    } finally {
      close()
    }

    // The second image shares the base layer: all of its chunks are reused, none written.
    const perl = await convertImage({ source: fixtures.ref('perl'), dest: `oci:${dest}:perl`, signingKey: keys.privateKey })
    const base = perl.layers[0]!
    assert.equal(base.written.chunks, 0)
    assert.ok(base.sharedWithExisting.chunks > 1000, `${base.sharedWithExisting.chunks} chunks shared`)
    assert.equal(base.catalog, python.layers[0]!.catalog)
    assert.ok(perl.layers[1]!.written.chunks > 0)

    const r = await verifyImage(origin, 'perl', { trusted: [keys.publicKey], workDir: join(dir, 'verify') })
    assert.equal(r.catalogs, 2)
  })

  it('reads the same image from an oci-archive', async () => {
    const fixtures = await ensureRealFixtures()
    const dir = await tempDir()
    const fromLayout = await convertImage({ source: fixtures.ref('python'), dest: `oci:${join(dir, 'a')}:p`, signingKey: keys.privateKey })
    const fromArchive = await convertImage({ source: `oci-archive:${fixtures.archive}`, dest: `oci:${join(dir, 'b')}:p`, signingKey: keys.privateKey })
    assert.deepEqual(fromArchive.layers.map(l => l.catalog), fromLayout.layers.map(l => l.catalog))
  })
})
