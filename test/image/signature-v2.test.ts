import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { createHash, createPublicKey, generateKeyPairSync, sign, type KeyObject } from 'node:crypto'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { promisify } from 'node:util'
import { convertImage } from '../../src/convert/convert.ts'
import { SignatureError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { imageName, keyId, nameMatches, parseLifetime, signatureTag, SIGNATURE_PAYLOAD_TYPE_V1 } from '../../src/format/signing.ts'
import { loadImage } from '../../src/image/load-image.ts'
import { mountName, RollbackError, RollbackGuard } from '../../src/image/rollback-guard.ts'
import { signImage } from '../../src/image/sign-image.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import { defaultSignedNames } from '../../src/image/write-image.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type Descriptor, type ImageManifest } from '../../src/oci/types.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

const keys = generateKeyPairSync('ed25519')
const execFileAsync = promisify(execFile)
const shoal = join(import.meta.dirname, '..', '..', 'bin', 'shoal')
const DAY = 86_400_000

async function image (signing: Parameters<typeof convertImage>[0]['signing'] = {}): Promise<{ dir: string, dest: string, ref: string, digest: Digest }> {
  const dir = await tempDir()
  const src = await buildSyntheticImage(join(dir, 'src'), 's', [[{ type: 'file', path: 'hello', content: 'world\n' }]])
  const dest = join(dir, 'dest')
  const report = await convertImage({ source: src.ref, dest: `oci:${dest}:img`, signingKey: keys.privateKey, signing })
  return { dir, dest, ref: `oci:${dest}:img`, digest: report.manifestDigest }
}

/** Every blob of the image itself (manifest, config, catalogs, packs) with the hash of its file. */
async function imageBlobs (dest: string, digest: Digest): Promise<Map<Digest, string>> {
  const layout = await OciLayout.open(dest)
  const manifest = await layout.readJson<ImageManifest>(digest, 'manifest')
  const out = new Map<Digest, string>()
  for (const d of [digest, manifest.config.digest, ...manifest.layers.map(l => l.digest)]) {
    out.set(d, createHash('sha256').update(await readFile(layout.blobPath(d))).digest('hex'))
  }
  return out
}

/** Replaces the image's signature with one in the old v1 format (manifest digest only), as shoal wrote it before. */
async function signV1 (dest: string, manifest: Descriptor, key: KeyObject): Promise<void> {
  const body = Buffer.from(JSON.stringify({ manifest: manifest.digest, mediaType: manifest.mediaType, size: manifest.size }))
  const type = Buffer.from(SIGNATURE_PAYLOAD_TYPE_V1)
  const pae = Buffer.concat([Buffer.from(`DSSEv1 ${type.length} `), type, Buffer.from(` ${body.length} `), body])
  const envelope = { payloadType: SIGNATURE_PAYLOAD_TYPE_V1, payload: body.toString('base64'), signatures: [{ keyid: keyId(createPublicKey(key)), sig: sign(null, pae, key).toString('base64') }] }
  const layout = await OciLayout.open(dest)
  const env = await layout.writeJsonBlob(envelope, MediaType.dsseEnvelope)
  const empty = await layout.writeJsonBlob({}, MediaType.ociEmpty)
  const sig = await layout.writeJsonBlob({ schemaVersion: 2, mediaType: MediaType.ociManifest, artifactType: MediaType.shoalSignature, config: empty, layers: [env], subject: manifest }, MediaType.ociManifest)
  await layout.setTag(signatureTag(manifest.digest), sig)
}

describe('signatures v2: names, version, expiry', () => {
  it('signs the names, a version and an expiry, and loadImage returns them', async () => {
    const before = Date.now()
    const { dest } = await image({ names: ['team/app:1', 'img'], version: 7 })
    const loaded = await loadImage(await DirOrigin.open(dest), 'img', { trusted: [keys.publicKey] })
    assert.deepEqual(loaded.signature?.names, ['team/app:1', 'img'])
    assert.equal(loaded.signature?.version, 7)
    const expires = Date.parse(loaded.signature!.expires!)
    assert.ok(expires >= before + 90 * DAY && expires <= Date.now() + 90 * DAY, loaded.signature!.expires!)
  })

  it('refuses a v1 signature with a message that says how to re-sign; shoal sign migrates it, changing only the signature', async () => {
    const { dest, ref, digest } = await image()
    const layout = await OciLayout.open(dest)
    await signV1(dest, await layout.resolveTag('img'), keys.privateKey)
    const origin = await DirOrigin.open(dest)
    await assert.rejects(loadImage(origin, 'img', { trusted: [keys.publicKey], image: ref }),
      (err: unknown) => err instanceof SignatureError && err.message.includes('v1 signature') && err.message.includes(`shoal sign ${ref} --key KEY`))
    const blobs = await imageBlobs(dest, digest)

    const report = await signImage(ref, keys.privateKey)
    assert.equal(report.replaced, 'v1')
    assert.deepEqual(report.names, ['img'])
    const loaded = await loadImage(origin, 'img', { trusted: [keys.publicKey], expectName: 'img' })
    assert.equal(loaded.manifestDigest, digest)
    assert.deepEqual(await imageBlobs(dest, digest), blobs)
  })

  it('refuses an expired signature; shoal sign --expires renews it without touching manifest, config, catalogs or packs', async () => {
    const { dest, ref, digest } = await image({ now: Date.now() - 10 * DAY, lifetimeMs: DAY, version: 100, names: ['img'] })
    const origin = await DirOrigin.open(dest)
    await assert.rejects(loadImage(origin, 'img', { trusted: [keys.publicKey], image: ref }),
      (err: unknown) => err instanceof SignatureError && /expired on \d{4}-/.test(err.message) && err.message.includes(`shoal sign ${ref} --key KEY --expires`))
    const blobs = await imageBlobs(dest, digest)
    const sigBefore = (await (await OciLayout.open(dest)).resolveTag(signatureTag(digest))).digest

    const report = await signImage(ref, keys.privateKey, { lifetimeMs: parseLifetime('30d') })
    assert.equal(report.previous?.version, 100)
    assert.ok(report.version > 100)
    assert.deepEqual(report.names, ['img'], 'the names of the signature being renewed')
    const loaded = await loadImage(origin, 'img', { trusted: [keys.publicKey] })
    assert.equal(loaded.manifestDigest, digest, 'the tag still names the same manifest')
    assert.ok(Math.abs(Date.parse(loaded.signature!.expires!) - (Date.now() + 30 * DAY)) < 60_000)
    assert.deepEqual(await imageBlobs(dest, digest), blobs, 'manifest, config, catalogs and packs are unchanged')
    assert.notEqual((await (await OciLayout.open(dest)).resolveTag(signatureTag(digest))).digest, sigBefore, 'only the signature changed')
  })

  it('allows a little clock skew past the expiry, and no more', async () => {
    const { dest } = await image({ lifetimeMs: DAY })
    const origin = await DirOrigin.open(dest)
    await loadImage(origin, 'img', { trusted: [keys.publicKey], now: Date.now() + DAY + 60_000 })
    await assert.rejects(loadImage(origin, 'img', { trusted: [keys.publicKey], now: Date.now() + DAY + 3_600_000 }), /expired/)
    const never = await image({ lifetimeMs: null })
    assert.equal((await loadImage(await DirOrigin.open(never.dest), 'img', { trusted: [keys.publicKey], now: Date.now() + 3650 * DAY })).signature?.expires, null)
  })

  it('refuses an image signed for another name than the one asked for', async () => {
    const { dest } = await image({ names: ['team/app:1'] })
    const origin = await DirOrigin.open(dest)
    await assert.rejects(loadImage(origin, 'img', { trusted: [keys.publicKey], expectName: 'team/app:2' }),
      (err: unknown) => err instanceof SignatureError && err.message.includes('signed for team/app:1, not for team/app:2'))
    await assert.rejects(verifyImage(origin, 'img', { trusted: [keys.publicKey], workDir: join(dest, '..', 'w'), expectName: 'img' }), /signed for team\/app:1, not for img/)
    const ok = await verifyImage(origin, 'img', { trusted: [keys.publicKey], workDir: join(dest, '..', 'w'), expectName: 'team/app:1' })
    assert.deepEqual(ok.signature.names, ['team/app:1'])
  })

  it('names: REPO:TAG without the registry host; a digest needs the repository only', () => {
    assert.equal(imageName('python', '3', 'docker.io'), 'library/python:3')
    assert.equal(imageName('team/app', '1', '127.0.0.1:5000'), 'team/app:1')
    assert.deepEqual(defaultSignedNames('docker://docker.io/library/python:3', 'docker://reg.example:5000/mirror/python:3-shoal'), ['mirror/python:3-shoal', 'library/python:3'])
    assert.deepEqual(defaultSignedNames('oci:/tmp/src:s', 'oci:/tmp/dest:img'), ['img'])
    assert.ok(nameMatches(['team/app:1'], 'team/app@sha256:00'))
    assert.ok(!nameMatches(['team/app:1'], 'team/other@sha256:00'))
    assert.ok(!nameMatches(['team/app:1'], 'team/app:2'))
    assert.equal(mountName(['docker://127.0.0.1:5000/team/app'], '1'), 'team/app:1')
    assert.equal(mountName(['/var/lib/images'], 'app'), 'app')
    assert.equal(mountName(['http://origin:8080'], 'sha256:ab'), '@sha256:ab')
  })

  it('the rollback guard refuses a lower version, and the same version of another image, after a restart too', async () => {
    const dir = await tempDir()
    const m1 = `sha256:${'1'.repeat(64)}` as Digest
    const m2 = `sha256:${'2'.repeat(64)}` as Digest
    const guard = RollbackGuard.forStateDir(dir)
    await guard.accept('team/app:1', 5, m1)
    await guard.accept('team/app:1', 5, m1)
    await assert.rejects(guard.accept('team/app:1', 5, m2), (err: unknown) => err instanceof RollbackError && /version 5 is signed for two images/.test(err.message))
    await guard.accept('team/app:1', 6, m2)
    await guard.accept('team/other:1', 1, m1)
    const again = RollbackGuard.forStateDir(dir) // as after a restart: from the file
    await assert.rejects(again.accept('team/app:1', 5, m1), (err: unknown) => err instanceof RollbackError && /version 5, older than version 6 .* saw on \d{4}-.*rollback or a stale mirror/.test(err.message))
    assert.equal((await again.seen('team/app:1'))?.version, 6)
    assert.equal((await stat(again.path)).mode & 0o777, 0o600)
    await writeFile(again.path, '{not json')
    await assert.rejects(again.accept('team/app:1', 7, m1), /damaged/)
  })

  it('shoal sign, verify and inspect on the command line show names, version, signedAt and expires', async () => {
    const { dir, ref } = await image({ names: ['img'], version: 3 })
    const key = join(dir, 'shoal.key')
    const pub = join(dir, 'shoal.pub')
    await writeFile(key, keys.privateKey.export({ type: 'pkcs8', format: 'pem' }))
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    const signed = await execFileAsync(shoal, ['sign', ref, '--key', key, '--signed-version', '42', '--expires', '2w', '--name', 'img', '--name', 'team/app:1'])
    assert.match(signed.stdout, /was version 3/)
    const verified = await execFileAsync(shoal, ['verify', ref, '--trust', pub, '--name', 'team/app:1'])
    assert.match(verified.stdout, /names: +img, team\/app:1/)
    assert.match(verified.stdout, /version: +42/)
    assert.match(verified.stdout, /signed at: +\d{4}-/)
    assert.match(verified.stdout, /expires: +\d{4}-/)
    const inspected = await execFileAsync(shoal, ['inspect', ref, '--trust', pub])
    assert.match(inspected.stdout, /version: +42/)
    await assert.rejects(execFileAsync(shoal, ['verify', ref, '--trust', pub, '--name', 'team/app:2']), /signed for img, team\/app:1, not for team\/app:2/)
    await assert.rejects(execFileAsync(shoal, ['sign', ref, '--key', key, '--name', 'ghcr.io/team/app:1']), /without the registry host/)
  })
})
