/**
 * `shoal convertd sync` (the backfill) and multi-platform indexes, against a real
 * registry that sends no notifications: what sync queues, the service converts.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { tempDir } from '../helpers/tmp.ts'
import { freePort, skopeoCopy, startRegistry, type TestRegistry } from '../registry/helpers.ts'
import { readQueue, startConvertd, tagsOf, waitFor, type ConvertdProcess } from './helpers.ts'

const execFileAsync = promisify(execFile)
const dir = await tempDir('shoal-convertd-sync-')
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'

describe('shoal convertd sync', () => {
  let registry: TestRegistry
  let fixtures: RealFixtures
  let convertd: ConvertdProcess | undefined
  const state = join(dir, 'state')
  const common = (): string[] => ['--state', state, '--key', join(dir, 'keys', 'shoal.key'), '--rules', join(dir, 'rules.yaml'), '--registry', registry.host, '--plain-http']

  before(async () => {
    fixtures = await ensureRealFixtures()
    await generateKeys(join(dir, 'keys'))
    await writeFile(join(dir, 'token'), 'sync-test-token-0123456789\n')
    await writeFile(join(dir, 'rules.yaml'), 'include:\n  - "app:*"\n  - "multi:v*"\n')
    registry = await startRegistry({ dir: join(dir, 'registry') })
  }, { timeout: 600_000 })

  after(async () => {
    await convertd?.stop()
    await registry?.stop()
  })

  test('queues what the rules take and is not converted; the service converts it (resuming after a SIGTERM), every platform of an index apart; a second sync queues nothing', { timeout: 180_000 }, async () => {
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/app:1`)
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/multi:source`)
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/other:1`)
    const head = await fetch(`${registry.url}/v2/multi/manifests/source`, { method: 'HEAD', headers: { accept: ACCEPT } })
    const child = { mediaType: head.headers.get('content-type')!, digest: head.headers.get('docker-content-digest')!, size: Number(head.headers.get('content-length')) }
    // A multi-platform index as buildx makes it: the image, and an attestation (platform unknown/unknown) to leave alone.
    const index = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [{ ...child, platform: { os: 'linux', architecture: 'amd64' } }, { ...child, platform: { os: 'unknown', architecture: 'unknown' } }] }
    const put = await fetch(`${registry.url}/v2/multi/manifests/v1`, { method: 'PUT', headers: { 'content-type': index.mediaType }, body: JSON.stringify(index) })
    assert.equal(put.status, 201, await put.text())

    const first = await execFileAsync(SHOAL_BIN, ['convertd', 'sync', ...common()])
    assert.match(first.stdout, /^queued +127\.0\.0\.1:\d+\/app:1$/m)
    assert.match(first.stdout, /^queued +127\.0\.0\.1:\d+\/multi:v1$/m)
    assert.match(first.stdout, /3 repositories, 4 tags: 2 queued, 0 already converted, 0 already queued or done, 2 not taken by the rules/)
    assert.deepEqual(readQueue(state).jobs.map(j => `${j.repository}:${j.tag} ${j.state} ${j.origin}`).sort(), ['app:1 queued sync', 'multi:v1 queued sync'])

    const serviceArgs = ['--listen', `127.0.0.1:${await freePort()}`, '--token-file', join(dir, 'token'), ...common()]
    convertd = await startConvertd(serviceArgs, join(dir, 'convertd.log'))
    // SIGTERM in the middle of a conversion: the service exits promptly, and the job waits in the queue, its try not counted.
    const running = await waitFor(() => readQueue(state).jobs.find(j => j.state === 'running' && j.bytesIn > 0), 'a conversion under way')
    const stopping = Date.now()
    await convertd.stop(30_000)
    const stopMs = Date.now() - stopping
    assert.ok(stopMs < 5_000, `stopped in ${stopMs} ms`)
    const interrupted = readQueue(state).jobs.find(j => j.id === running.id)!
    assert.deepEqual([interrupted.state, interrupted.attempts], ['queued', 0])
    convertd = await startConvertd(serviceArgs, join(dir, 'convertd.log'))
    await waitFor(() => { const { counts } = readQueue(state); return counts.done === 3 || counts.failed > 0 ? counts : undefined }, 'three jobs done (app:1, the index, its one platform)')
    const { jobs, counts } = readQueue(state)
    assert.deepEqual(counts, { queued: 0, running: 0, done: 3, failed: 0, skipped: 0 }, JSON.stringify(jobs))
    assert.ok((await tagsOf(registry.url, 'app')).includes('1-shoal'))
    const multi = await tagsOf(registry.url, 'multi')
    assert.ok(multi.includes('v1-shoal-linux-amd64'), multi.join(' '))
    assert.ok(multi.includes(`sha256-${child.digest.slice(7)}.shoal`))
    assert.ok(!multi.includes('v1-shoal'), 'the index itself is not converted')
    const { stdout } = await execFileAsync(SHOAL_BIN, ['verify', `docker://${registry.host}/multi:v1-shoal-linux-amd64`, '--trust', join(dir, 'keys', 'shoal.pub'), '--plain-http', '--name', 'multi:v1'])
    assert.match(stdout, /^OK /)

    const second = await execFileAsync(SHOAL_BIN, ['convertd', 'sync', ...common()])
    assert.match(second.stdout, /: 0 queued, 0 already converted, 2 already queued or done, /)
    const status = await execFileAsync(SHOAL_BIN, ['convertd', 'status', '--state', state])
    assert.match(status.stdout, /^queued 0, running 0, done 3, failed 0, skipped 0$/m)
  })
})
