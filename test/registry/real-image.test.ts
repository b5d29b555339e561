import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { NotFoundError, OriginError } from '../../src/errors.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { decodeChunk } from '../../src/format/codec.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { generateKeys, loadPublicKey } from '../../src/format/signing.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { verifyImage } from '../../src/image/verify-image.ts'
import type { Origin } from '../../src/origin/origin.ts'
import { RegistryOrigin } from '../../src/origin/registry-origin.ts'
import { RegistryClient } from '../../src/registry/client.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk, snapshotView } from '../helpers/tree-snapshot.ts'
import { makeHtpasswd, makeTlsFiles, skopeoCopy, startRegistry, type TestRegistry, type TlsFiles } from './helpers.ts'

/**
 * The real python image (Debian bookworm + python3, scripts/fixtures/debian-images.ts)
 * through docker-registry with TLS (a CA made here with openssl) and htpasswd
 * basic auth: pushed by skopeo, converted registry → registry by the shoal
 * command, then verified and read through a RegistryOrigin.
 */

const MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url))
const dir = await tempDir()

describe('the python image through a TLS registry with basic auth', () => {
  let fixtures: RealFixtures
  let tls: TlsFiles
  let registry: TestRegistry
  const access = (): { credentials: string, caFile: string } => ({ credentials: 'alice:wonder land', caFile: tls.caFile })

  before(async () => {
    fixtures = await ensureRealFixtures()
    tls = await makeTlsFiles(dir)
    registry = await startRegistry({ dir: join(dir, 'registry'), tls, htpasswd: await makeHtpasswd(dir, 'alice', 'wonder land') })
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/debian/python:latest`, { creds: 'alice:wonder land' })
  })
  after(async () => { await registry?.stop() })

  test('shoal convert registry → registry (credentials from DOCKER_CONFIG, --ca), then verify and read every file', { timeout: 300_000 }, async () => {
    const keys = join(dir, 'keys')
    await generateKeys(keys)
    // A docker login's config.json, found through $DOCKER_CONFIG; HOME points at an empty
    // directory so no real login file of the machine running the test takes part.
    const dockerConfig = join(dir, 'docker')
    await mkdir(dockerConfig)
    await writeFile(join(dockerConfig, 'config.json'), JSON.stringify({ auths: { [registry.host]: { auth: Buffer.from('alice:wonder land').toString('base64') } } }))
    const env = { ...process.env, HOME: join(dir, 'home'), DOCKER_CONFIG: dockerConfig, REGISTRY_AUTH_FILE: '', XDG_RUNTIME_DIR: '', XDG_CONFIG_HOME: '' }
    const { stdout } = await shoal(['convert', `docker://${registry.host}/debian/python:latest`, `docker://${registry.host}/debian/python:latest-shoal`,
      '--key', join(keys, 'shoal.key'), '--ca', tls.caFile, '--json'], env)
    const report = JSON.parse(stdout) as { manifestDigest: string, layers: unknown[], push: { blobs: Record<string, number>, uploadedBytes: number } }
    assert.equal(report.layers.length, 2)
    assert.equal(report.push.blobs.present, 0)
    assert.ok(report.push.uploadedBytes > 30 << 20, `${report.push.uploadedBytes} bytes uploaded`)

    const origin = await RegistryOrigin.open(`docker://${registry.host}/debian/python`, access())
    const trusted = [await loadPublicKey(join(keys, 'shoal.pub'))]
    const verified = await verifyImage(origin, 'latest-shoal', { trusted, workDir: join(dir, 'verify') })
    assert.equal(verified.manifestDigest, report.manifestDigest)
    assert.equal(verified.catalogs, 2)

    const { view, close } = await openImageView(origin, 'latest-shoal', { trusted, catalogDir: join(dir, 'catalogs') })
    try {
      // A few files chunk by chunk, each chunk its own Range request to the registry...
      for (const path of ['/usr/bin/python3.11', '/usr/lib/python3.11/json/__init__.py', '/usr/lib/os-release']) {
        const node = view.resolve(path)
        assert.ok(node !== undefined, path)
        const hash = createHash('sha256')
        for (const e of view.extents(node)) hash.update(decodeChunk(await origin.getRange(e.pack, e.packOffset, e.storedLength), e.codec, e.length))
        assert.equal(hash.digest('hex'), createHash('sha256').update(await readFile(join(fixtures.unpacked.python, path))).digest('hex'), path)
      }
      // ...and every path, mode, owner, xattr, link and content hash equals umoci unpack of
      // the source, reading each pack once (6,500 sequential range requests would take minutes).
      const expected = await snapshotDisk(fixtures.unpacked.python, { mtimes: true })
      const actual = await snapshotView(view, wholePacks(origin), { mtimes: true })
      assert.ok(expected.size > 5000, `the reference tree has ${expected.size} paths`)
      assert.deepEqual(diffSnapshots(expected, actual), [])
    } finally {
      close()
    }
  })

  test('wrong credentials, none, an untrusted certificate, an unknown repository: errors that say what to do', async () => {
    const host = registry.host
    const wrong = await RegistryOrigin.open(`docker://${host}/debian/python`, { credentials: 'alice:guess', caFile: tls.caFile })
    await assert.rejects(wrong.resolve('latest'), (err: unknown) => err instanceof OriginError && err.status === 401 && !err.retryable &&
      /refused the credentials of user "alice" \(from the command line or agent config\): check the user name and password/.test(err.message))

    const anonymous = new RegistryClient({ registry: host, ca: await readFile(tls.caFile, 'utf8') })
    await assert.rejects(anonymous.resolveManifest('debian/python', 'latest'), (err: unknown) => err instanceof OriginError && err.status === 401 &&
      /requires credentials: log in \(docker login \/ podman login 127\.0\.0\.1:\d+\), or pass USER:PASSWORD/.test(err.message))

    const untrusting = new RegistryClient({ registry: host, credentials: { username: 'alice', password: 'wonder land' } })
    await assert.rejects(untrusting.resolveManifest('debian/python', 'latest'), (err: unknown) => err instanceof OriginError && !err.retryable &&
      /the TLS certificate is not trusted \(UNABLE_TO_VERIFY_LEAF_SIGNATURE.*pass its certificate \(--ca FILE/.test(err.message))
    assert.equal(untrusting.stats.retries, 0)

    const origin = await RegistryOrigin.open(`docker://${host}/debian/nothing`, access())
    await assert.rejects(origin.resolve('latest'), NotFoundError)
  })
})

/** ORIGIN, with each blob read whole (digest-checked) on first use and ranges served from memory. */
function wholePacks (origin: Origin): Origin {
  const blobs = new Map<Digest, Promise<Uint8Array>>()
  return {
    name: origin.name,
    resolve: async (ref, options) => await origin.resolve(ref, options),
    getBlob: async (blob, options) => await origin.getBlob(blob, options),
    getRange: async (blob, offset, length) => {
      if (!blobs.has(blob)) blobs.set(blob, origin.getBlob(blob))
      return (await blobs.get(blob)!).subarray(offset, offset + length)
    }
  }
}

/** Runs the shoal command; fails with its stderr. */
async function shoal (args: string[], env: NodeJS.ProcessEnv): Promise<{ stdout: string, stderr: string }> {
  return await new Promise((resolve, reject) => {
    execFile(process.execPath, [MAIN, ...args], { env, maxBuffer: 16 << 20, timeout: 240_000 }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`shoal ${args.join(' ')} failed: ${stderr}`, { cause: err }))
      else resolve({ stdout, stderr })
    })
  })
}
