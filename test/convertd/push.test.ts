/**
 * Convert on push, end to end: Debian's docker-registry with a notifications
 * endpoint pointing at a `shoal convertd` process; images pushed with skopeo.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { EVENTS_MEDIA_TYPE } from '../../src/convertd/constants.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { tempDir } from '../helpers/tmp.ts'
import { freePort, skopeoCopy, startRegistry, type TestRegistry } from '../registry/helpers.ts'
import { readQueue, startConvertd, tagsOf, waitFor, type ConvertdProcess } from './helpers.ts'

const execFileAsync = promisify(execFile)
const dir = await tempDir('shoal-convertd-')
const TOKEN = 'test-token-0123456789abcdef'
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json'

describe('shoal convertd with a real registry', () => {
  let registry: TestRegistry
  let fixtures: RealFixtures
  let convertd: ConvertdProcess
  let args: string[]
  const state = join(dir, 'state')
  const log = join(dir, 'convertd.log')
  const pub = join(dir, 'keys', 'shoal.pub')

  const digestOf = async (repo: string, tag: string): Promise<string> => {
    const res = await fetch(`${registry.url}/v2/${repo}/manifests/${tag}`, { method: 'HEAD', headers: { accept: ACCEPT } })
    assert.equal(res.status, 200, `${repo}:${tag}`)
    return res.headers.get('docker-content-digest')!
  }
  const digestTag = (digest: string): string => `sha256-${digest.slice(7)}.shoal`
  const post = async (body: unknown, authorization?: string): Promise<Response> => await fetch(convertd.ready.events, {
    method: 'POST',
    headers: { 'content-type': EVENTS_MEDIA_TYPE, ...(authorization !== undefined ? { authorization } : {}) },
    body: JSON.stringify(body)
  })
  const metrics = async (): Promise<string> => await (await fetch(convertd.ready.metrics)).text()
  const context = async (): Promise<string> => `convertd log:\n${(await readFile(log, 'utf8')).split('\n').slice(-20).join('\n')}`

  before(async () => {
    fixtures = await ensureRealFixtures()
    await generateKeys(join(dir, 'keys'))
    await writeFile(join(dir, 'token'), `${TOKEN}\n`)
    await writeFile(join(dir, 'rules.json'), JSON.stringify({ include: ['python:*', 'perl:*'], exclude: ['python:*-rc'] }))
    const port = await freePort()
    args = ['--listen', `127.0.0.1:${port}`, '--state', state, '--key', join(dir, 'keys', 'shoal.key'), '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'token'), '--plain-http', '--log-level', 'debug']
    convertd = await startConvertd(args, log)
    registry = await startRegistry({ dir: join(dir, 'registry'), accessLog: true, notifications: { url: convertd.ready.events, token: TOKEN } })
  }, { timeout: 600_000 })

  after(async () => {
    await convertd?.stop()
    await registry?.stop()
  })

  test('skopeo copy of python makes python:3-shoal and the digest tag appear, signed and verifiable', { timeout: 180_000 }, async () => {
    const started = Date.now()
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/python:3`)
    const digest = await digestOf('python', '3')
    await waitFor(async () => (await tagsOf(registry.url, 'python')).includes(digestTag(digest)), 'the digest tag', 120_000).catch(async err => { throw new Error(`${(err as Error).message}\n${await context()}`) })
    const seconds = (Date.now() - started) / 1000
    process.stderr.write(`# push to converted digest tag: ${seconds.toFixed(1)} s\n`)
    assert.ok((await tagsOf(registry.url, 'python')).includes('3-shoal'))
    for (const image of [`docker://${registry.host}/python:3-shoal`, `docker://${registry.host}/python:${digestTag(digest)}`]) {
      const { stdout } = await execFileAsync(SHOAL_BIN, ['verify', image, '--trust', pub, '--plain-http', '--name', 'python:3'])
      assert.match(stdout, /^OK /)
    }
    await waitFor(() => readQueue(state).jobs.find(j => j.digest === digest && j.state !== 'running'), 'the job to end', 10_000)
    const { stdout } = await execFileAsync(SHOAL_BIN, ['convertd', 'status', '--state', state, '--json'])
    const status = JSON.parse(stdout) as ReturnType<typeof readQueue>
    const job = status.jobs.find(j => j.digest === digest)!
    assert.equal(job.state, 'done')
    assert.equal(job.origin, 'event')
    assert.ok(job.bytesIn > 1e6 && job.bytesOut > 1e6, JSON.stringify(job))
    const m = await metrics()
    assert.match(m, /shoal_convertd_jobs\{state="done"\} 1/)
    assert.match(m, /shoal_convertd_conversion_seconds_count 1/)
    assert.match(m, /shoal_convertd_bytes_in_total [1-9]/)
  })

  test('the same push twice and the same event delivered twice: one conversion', { timeout: 120_000 }, async () => {
    const digest = await digestOf('python', '3')
    const eventsBefore = Number(/shoal_convertd_events_total\{outcome="duplicate"\} (\d+)/.exec(await metrics())?.[1] ?? 0)
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/python:3`)
    const event = { events: [{ id: 'e1', action: 'push', target: { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest, repository: 'python', tag: '3' }, request: { host: registry.host } }] }
    for (let i = 0; i < 2; i++) {
      const res = await post(event, `Bearer ${TOKEN}`)
      assert.equal(res.status, 200)
      assert.deepEqual(await res.json(), { duplicate: 1 })
    }
    // The registry's own delivery of the second push arrives on its schedule.
    await waitFor(async () => Number(/shoal_convertd_events_total\{outcome="duplicate"\} (\d+)/.exec(await metrics())?.[1] ?? 0) >= eventsBefore + 3, 'the registry\'s event of the second push')
    const jobs = readQueue(state).jobs.filter(j => j.digest === digest)
    assert.equal(jobs.length, 1)
    assert.equal(jobs[0]!.attempts, 1)
    const twinPuts = registry.requests().filter(r => r.method === 'PUT' && r.path === '/v2/python/manifests/3-shoal')
    assert.equal(twinPuts.length, 1, 'the conversion was pushed once')
  })

  test('the same image pushed under another tag: not converted again, signed for both names, tagged', { timeout: 120_000 }, async () => {
    const digest = await digestOf('python', '3')
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/python:latest`)
    await waitFor(async () => (await tagsOf(registry.url, 'python')).includes('latest-shoal'), 'python:latest-shoal', 60_000).catch(async err => { throw new Error(`${(err as Error).message}\n${await context()}`) })
    for (const name of ['python:latest', 'python:3']) {
      const { stdout } = await execFileAsync(SHOAL_BIN, ['verify', `docker://${registry.host}/python:${digestTag(digest)}`, '--trust', pub, '--plain-http', '--name', name])
      assert.match(stdout, /^OK /, name)
    }
    assert.equal(await digestOf('python', 'latest-shoal'), await digestOf('python', '3-shoal'))
    assert.equal(readQueue(state).jobs.filter(j => j.digest === digest).length, 1)
    assert.match(await metrics(), /shoal_convertd_events_total\{outcome="new-name"\} 1/)
  })

  test('an image outside the rules, and shoal\'s own artifacts, are not converted', { timeout: 120_000 }, async () => {
    const ignoredBefore = Number(/shoal_convertd_events_total\{outcome="ignored"\} (\d+)/.exec(await metrics())?.[1] ?? 0)
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/plain:1`)
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/python:3-rc`)
    await waitFor(async () => Number(/shoal_convertd_events_total\{outcome="ignored"\} (\d+)/.exec(await metrics())?.[1] ?? 0) >= ignoredBefore + 2, 'the two pushes to be seen and ignored')
    assert.deepEqual((await tagsOf(registry.url, 'plain')).sort(), ['1'])
    assert.ok(!(await tagsOf(registry.url, 'python')).includes('3-rc-shoal'))
    const jobs = readQueue(state).jobs
    assert.ok(!jobs.some(j => j.repository === 'plain' || j.tag === '3-rc' || j.tag.includes('shoal')), JSON.stringify(jobs.map(j => `${j.repository}:${j.tag}`)))
  })

  test('a missing or wrong token gets 401', async () => {
    const event = { events: [] }
    for (const auth of [undefined, 'Bearer wrong-token-0123456789', `Basic ${TOKEN}`, `Bearer ${TOKEN}x`]) {
      const res = await post(event, auth)
      assert.equal(res.status, 401, String(auth))
      assert.equal(res.headers.get('www-authenticate'), 'Bearer realm="shoal-convertd"')
      await res.body?.cancel()
    }
    assert.match(await metrics(), /shoal_convertd_unauthorized_total [4-9]/)
  })

  test('killed with kill -9 in the middle of a conversion and started again: the job finishes, no half-written tag', { timeout: 240_000 }, async () => {
    await skopeoCopy(fixtures.ref('perl'), `docker://${registry.host}/perl:5`)
    const digest = await digestOf('perl', '5')
    await waitFor(() => readQueue(state).jobs.find(j => j.digest === digest && j.state === 'running' && j.bytesIn > 0), 'the perl conversion to be under way')
    convertd.child.kill('SIGKILL')
    await new Promise(resolve => convertd.child.once('exit', resolve))
    const tags = await tagsOf(registry.url, 'perl')
    assert.deepEqual(tags, ['5'], 'no tag of the conversion was written')
    assert.equal(readQueue(state).jobs.find(j => j.digest === digest)!.state, 'running')
    convertd = await startConvertd(args, log)
    await waitFor(async () => (await tagsOf(registry.url, 'perl')).includes(digestTag(digest)), 'the resumed conversion', 180_000).catch(async err => { throw new Error(`${(err as Error).message}\n${await context()}`) })
    // The digest tag is the push's last step; the job is marked done right after it.
    const job = await waitFor(() => readQueue(state).jobs.find(j => j.digest === digest && j.state !== 'running'), 'the job to end', 10_000)
    assert.equal(job.state, 'done')
    assert.equal(job.attempts, 2)
    const { stdout } = await execFileAsync(SHOAL_BIN, ['verify', `docker://${registry.host}/perl:5-shoal`, '--trust', pub, '--plain-http', '--name', 'perl:5'])
    assert.match(stdout, /^OK /)
    assert.deepEqual(await readdir(join(state, 'work')), [], 'the staging of the killed run is gone')
  })
  test('a service whose state was lost finds the conversion in the registry: done without converting again', { timeout: 60_000 }, async () => {
    const digest = await digestOf('python', '3')
    const fresh = join(dir, 'fresh-state')
    const other = await startConvertd(['--listen', `127.0.0.1:${await freePort()}`, ...args.slice(2).map(a => a === state ? fresh : a)], log)
    try {
      const puts = (): number => registry.requests().filter(r => r.method === 'PUT' && r.path === '/v2/python/manifests/3-shoal').length
      const before = puts()
      const res = await fetch(other.ready.events, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': EVENTS_MEDIA_TYPE }, body: JSON.stringify({ events: [{ action: 'push', target: { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest, repository: 'python', tag: '3' }, request: { host: registry.host } }] }) })
      assert.deepEqual(await res.json(), { queued: 1 })
      const job = await waitFor(() => readQueue(fresh).jobs.find(j => j.state !== 'queued' && j.state !== 'running'), 'the job to end', 30_000)
      assert.equal(job.state, 'done')
      assert.match(job.reason ?? '', /^already converted: sha256-[0-9a-f]{64}\.shoal was there$/)
      assert.equal(job.result, await digestOf('python', '3-shoal'))
      assert.equal(puts(), before, 'nothing was pushed')
    } finally {
      await other.stop()
    }
  })
})
