/**
 * Convert on push, through to a pod: the python image is pushed (skopeo) to a
 * docker-registry that notifies `shoal convertd`; once its conversion is in the
 * registry, a CRI pod naming the ORIGINAL image starts on a containerd whose
 * snapshotter is a shoal agent, lazily. Nobody runs `shoal convert`.
 */
import assert from 'node:assert/strict'
import { open, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats } from '../../src/agent/agent.ts'
import { callAgent } from '../../src/agent/control.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import type { ImageManifest } from '../../src/oci/types.ts'
import { readQueue, startConvertd, tagsOf, waitFor, type ConvertdProcess } from '../convertd/helpers.ts'
import { startContainerd, type Containerd } from '../helpers/containerd/containerd.ts'
import { pushSandboxImage } from '../helpers/containerd/sandbox-image.ts'
import { tempDir } from '../helpers/tmp.ts'
import { freePort, skopeoCopy, startRegistry, type TestRegistry } from '../registry/helpers.ts'

const dir = await tempDir('shoal-convertd-cri-')
const TOKEN = 'cri-test-token-0123456789abcdef'
const PYTHON = ['python3', '-c', 'import json, sqlite3; print(json.dumps({"answer": 42}))']

describe('convert on push, then a pod naming the original image', () => {
  let registry: TestRegistry
  let fixtures: RealFixtures
  let convertd: ConvertdProcess
  let agent: AgentProcess
  let containerd: Containerd
  const state = join(dir, 'convertd')
  const agentLog = join(dir, 'agent.log')

  before(async () => {
    fixtures = await ensureRealFixtures()
    await generateKeys(join(dir, 'keys'))
    await writeFile(join(dir, 'token'), TOKEN)
    // Only python: the pause image containerd pulls goes to the same registry and must stay as it is.
    await writeFile(join(dir, 'rules.json'), JSON.stringify({ include: ['python:*'] }))
    convertd = await startConvertd(['--listen', `127.0.0.1:${await freePort()}`, '--state', state, '--key', join(dir, 'keys', 'shoal.key'), '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'token'), '--plain-http'], join(dir, 'convertd.log'))
    registry = await startRegistry({ dir: join(dir, 'registry'), accessLog: true, notifications: { url: convertd.ready.events, token: TOKEN } })
    const sandboxImage = await pushSandboxImage(registry.host, join(dir, 'pause'))
    const socket = join(dir, 'snap.sock')
    const fd = await open(agentLog, 'a')
    agent = await startAgentProcess(join(dir, 'agent'), ['--trust', join(dir, 'keys', 'shoal.pub'), '--snapshotter-socket', socket, '--no-p2p', '--metrics', 'off'], { stderr: fd.fd })
    await fd.close()
    containerd = await startContainerd({ dir: join(dir, 'containerd'), sandboxImage, snapshotter: { name: 'shoal', socket }, registryHosts: [registry.host] })
  }, { timeout: 900_000 })

  after(async () => {
    const errors: unknown[] = []
    await containerd?.stop().catch(err => { errors.push(err) })
    await agent?.stop().catch(err => { errors.push(err) })
    await convertd?.stop().catch(err => { errors.push(err) })
    await registry?.stop().catch(err => { errors.push(err) })
    if (errors.length > 0) throw new AggregateError(errors, 'teardown failed')
  }, { timeout: 120_000 })

  test('push python, wait for convertd, and a CRI pod naming python:3 starts lazily: no original layer is downloaded', { timeout: 300_000 }, async () => {
    const pushed = Date.now()
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/python:3`)
    await waitFor(() => readQueue(state).jobs.find(j => j.repository === 'python' && (j.state === 'done' || j.state === 'failed')), 'the conversion', 180_000)
    const job = readQueue(state).jobs.find(j => j.repository === 'python')!
    assert.equal(job.state, 'done', job.reason)
    assert.ok((await tagsOf(registry.url, 'python')).includes(`sha256-${job.digest.slice(7)}.shoal`))
    process.stderr.write(`# push to converted: ${((Date.now() - pushed) / 1000).toFixed(1)} s\n`)

    const seen = registry.requests().length
    const result = await containerd.runPod({ image: `${registry.host}/python:3`, command: PYTHON, exitTimeoutMs: 120_000 })
    assert.equal(result.exitCode, 0, `stderr: ${result.stderr}\n${result.reason} ${result.message}\nagent:\n${(await readFile(agentLog, 'utf8')).split('\n').slice(-20).join('\n')}`)
    assert.equal(result.stdout, '{"answer": 42}\n')
    const layout = await OciLayout.open(fixtures.layoutDir)
    const manifest = JSON.parse((await layout.readBlob((await layout.resolveTag('python')).digest)).toString()) as ImageManifest
    const gets = registry.requests().slice(seen).filter(r => r.method === 'GET' && r.path.includes('/blobs/')).map(r => r.path)
    for (const layer of manifest.layers) assert.ok(!gets.some(p => p.endsWith(layer.digest)), `containerd downloaded original layer ${layer.digest}`)
    const stats = await callAgent<AgentStats>(agent.socket, 'GET', '/v1/stats')
    assert.equal(stats.snapshotter!.lazy, manifest.layers.length, `fallbacks ${JSON.stringify(stats.snapshotter!.fallbacks)}`)
  })
})
