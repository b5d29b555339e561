import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { open, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { promisify } from 'node:util'
import { convertImage } from '../../src/convert/convert.ts'
import { IntegrityError, SignatureError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import type { ImageManifest } from '../../src/oci/types.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

const keys = generateKeyPairSync('ed25519')
const execFileAsync = promisify(execFile)
const shoal = join(import.meta.dirname, '..', '..', 'bin', 'shoal')

/** A freshly converted image and the digests of its parts. */
async function converted () {
  const dir = await tempDir()
  const src = await buildSyntheticImage(join(dir, 'src'), 'std', standardSyntheticLayers())
  const dest = join(dir, 'dest')
  const report = await convertImage({ source: src.ref, dest: `oci:${dest}:img`, signingKey: keys.privateKey })
  const layout = await OciLayout.open(dest)
  const manifest = await layout.readJson<ImageManifest>(report.manifestDigest, 'manifest')
  const catalog = manifest.layers.find(l => l.mediaType.includes('catalog'))!.digest
  const pack = manifest.layers.find(l => l.mediaType.includes('pack'))!.digest
  return { dir, dest, layout, manifestDigest: report.manifestDigest, config: manifest.config.digest, catalog, pack }
}

async function flipByte (layout: OciLayout, digest: Digest, at = 0.5): Promise<void> {
  const fh = await open(layout.blobPath(digest), 'r+')
  try {
    const { size } = await fh.stat()
    const pos = Math.floor(size * at)
    const b = Buffer.alloc(1)
    await fh.read(b, 0, 1, pos)
    b[0] = b[0]! ^ 0x01
    await fh.write(b, 0, 1, pos)
  } finally { await fh.close() }
}

async function verify (dest: string, trusted = [keys.publicKey]) {
  return await verifyImage(await DirOrigin.open(dest), 'img', { trusted, workDir: await tempDir() })
}

describe('shoal verify', () => {
  it('accepts an intact image and counts what it checked', async () => {
    const { dest } = await converted()
    const r = await verify(dest)
    assert.ok(r.chunks > 0 && r.packs > 0 && r.files > 0)
  })

  for (const part of ['pack', 'catalog', 'config', 'manifest'] as const) {
    it(`names the ${part} when one of its bytes is flipped`, async () => {
      const c = await converted()
      const digest = part === 'manifest' ? c.manifestDigest : c[part]
      await flipByte(c.layout, digest)
      await assert.rejects(verify(c.dest), (err: Error) => err instanceof IntegrityError && err.message.includes(`${part} ${digest}`))
    })
  }

  it('refuses an image signed by another key', async () => {
    const { dest } = await converted()
    const other = generateKeyPairSync('ed25519')
    await assert.rejects(verify(dest, [other.publicKey]), SignatureError)
  })

  it('refuses a re-tagged signature (signature of another manifest)', async () => {
    const { dest, layout, manifestDigest } = await converted()
    // Point the tag at a different (unsigned) manifest that reuses the same config.
    const manifest = await layout.readJson<ImageManifest>(manifestDigest, 'manifest')
    const forged = await layout.writeJsonBlob({ ...manifest, annotations: { forged: 'yes' } }, manifest.mediaType!, { artifactType: manifest.artifactType! })
    await layout.setTag('img', forged)
    await assert.rejects(verify(dest), SignatureError)
  })

  it('CLI: exits 1 and names the first bad object; exits 0 when intact', async () => {
    const c = await converted()
    const pub = join(c.dir, 'shoal.pub')
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    const ok = await execFileAsync(shoal, ['verify', `oci:${c.dest}:img`, '--trust', pub])
    assert.match(ok.stdout, /^OK /)
    await flipByte(c.layout, c.pack, 0.9)
    const failed = await execFileAsync(shoal, ['verify', `oci:${c.dest}:img`, '--trust', pub]).then(() => undefined, (err: { code: number, stderr: string }) => err)
    assert.ok(failed !== undefined, 'verify must fail')
    assert.equal(failed.code, 1)
    assert.match(failed.stderr, new RegExp(`pack ${c.pack}`))
  })
})
