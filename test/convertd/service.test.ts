/** The HTTP side of convertd in-process, with a fake converter: what each request gets. */
import assert from 'node:assert/strict'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import pino from 'pino'
import { defaultConvertdConfig } from '../../src/convertd/config.ts'
import { EVENTS_MEDIA_TYPE } from '../../src/convertd/constants.ts'
import { Rules } from '../../src/convertd/rules.ts'
import { Convertd } from '../../src/convertd/service.ts'
import type { Converter, Job } from '../../src/convertd/types.ts'
import { tempDir } from '../helpers/tmp.ts'
import { readQueue, waitFor } from './helpers.ts'

const TOKEN = 'service-test-token-0123456789'
const digest = `sha256:${'b'.repeat(64)}`

test('events: manifest pushes by tag are queued once, everything else is counted and answered; bad bodies get 400 and 413', async () => {
  const dir = await tempDir()
  await writeFile(join(dir, 'token'), TOKEN)
  const converted: Job[] = []
  const converter: Converter = {
    convert: async job => { converted.push(job); return { kind: 'converted', result: `sha256:${'c'.repeat(64)}`, bytesIn: 10, bytesOut: 20 } },
    addName: async () => {}
  }
  const config = { ...defaultConvertdConfig(), stateDir: join(dir, 'state'), listen: '127.0.0.1:0', rules: join(dir, 'unused'), tokenFile: join(dir, 'token'), pollMs: 50 }
  const service = await Convertd.start(config, { log: pino({ level: 'silent' }), converter, rules: new Rules({ include: ['app:*'] }, { defaultKey: '/k' }) })
  try {
    const post = async (body: string, type = EVENTS_MEDIA_TYPE): Promise<Response> => await fetch(`${service.url}/events`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': type }, body })
    const event = (action: string, target: Record<string, unknown>): unknown => ({ action, target: { repository: 'app', digest, ...target }, request: { host: 'reg.example:5000' } })
    const envelope = { events: [
      event('push', { mediaType: 'application/vnd.oci.image.manifest.v1+json', tag: '1' }),
      event('push', { mediaType: 'application/vnd.oci.image.manifest.v1+json', tag: '1' }),
      event('push', { mediaType: 'application/vnd.oci.image.manifest.v1+json' }),
      event('push', { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' }),
      event('pull', { mediaType: 'application/vnd.oci.image.manifest.v1+json', tag: '1' }),
      event('push', { mediaType: 'application/vnd.oci.image.manifest.v1+json', tag: '1-shoal' }),
      event('push', { mediaType: 'application/vnd.docker.distribution.manifest.v2+json', tag: 'latest' })
    ] }
    const res = await post(JSON.stringify(envelope))
    assert.equal(res.status, 200)
    assert.deepEqual(await res.json(), { queued: 1, duplicate: 1, untagged: 1, 'not-a-manifest': 1, 'not-a-push': 1, ignored: 1, 'new-name': 1 })
    await waitFor(() => converted.length === 1 && readQueue(config.stateDir).counts.done === 1, 'the job to run')
    assert.equal(converted[0]!.registry, 'reg.example:5000', 'the registry is the Host the push used')

    assert.equal((await post('{"events": "no"}')).status, 400)
    assert.equal((await post('not json')).status, 400)
    assert.equal((await post(JSON.stringify({ events: [{ action: 'push', target: { mediaType: 'application/vnd.oci.image.manifest.v1+json', tag: '2', repository: 'app', digest: 'sha256:short' } }] }))).status, 400)
    assert.equal((await post('x'.repeat((1 << 20) + 1))).status, 413)
    assert.equal((await fetch(`${service.url}/events`, { headers: { authorization: `Bearer ${TOKEN}` } })).status, 405)
    assert.equal((await fetch(`${service.url}/nothing`)).status, 404)
    const metrics = await (await fetch(`${service.url}/metrics`)).text()
    assert.match(metrics, /shoal_convertd_jobs\{state="done"\} 1/)
    assert.match(metrics, /shoal_convertd_bytes_out_total 20/)
    assert.equal(readQueue(config.stateDir).jobs.length, 1, 'nothing from the bad requests was queued')
  } finally {
    await service.stop()
  }
})
