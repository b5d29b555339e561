import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { mkdtemp, readFile, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN, startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats, MountInfo } from '../../src/agent/agent.ts'
import { callAgent } from '../../src/agent/control.ts'
import { convertImage, type ConvertReport } from '../../src/convert/convert.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { isFuseMount } from '../../src/fs/stale-mount.ts'
import { startOriginServer, type OriginServer } from '../../src/origin/server.ts'
import { openedFiles, sumSizes } from '../helpers/opened-files.ts'
import { removeDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk } from '../helpers/tree-snapshot.ts'

const execFileAsync = promisify(execFile)
const PYTHON_CMD = ['python3', '-c', 'import json, sqlite3; print(42)']

describe('agent: the real python image, lazily', () => {
  let fixtures: RealFixtures
  let dir: string
  let origin: OriginServer
  let pub: string
  let keyFile: string
  let images: string
  let python: ConvertReport
  let perl: ConvertReport
  const agents: AgentProcess[] = []

  before(async () => {
    fixtures = await ensureRealFixtures()
    dir = await mkdtemp(join(tmpdir(), 'shoal-agent-test-'))
    const keys = generateKeyPairSync('ed25519')
    pub = join(dir, 'shoal.pub')
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    keyFile = join(dir, 'shoal.key')
    await writeFile(keyFile, keys.privateKey.export({ type: 'pkcs8', format: 'pem' }))
    images = join(dir, 'images')
    python = await convertImage({ source: fixtures.ref('python'), dest: `oci:${images}:python`, signingKey: keys.privateKey })
    perl = await convertImage({ source: fixtures.ref('perl'), dest: `oci:${images}:perl`, signingKey: keys.privateKey })
    origin = await startOriginServer({ dir: images })
  })
  after(async () => {
    await Promise.all(agents.map(a => a.stop()))
    await origin?.close()
    await removeDir(dir)
  })

  async function agent (name: string): Promise<AgentProcess> {
    const a = await startAgentProcess(join(dir, name), ['--origin', origin.url, '--trust', pub, '--no-p2p', '--log-level', 'warn'])
    agents.push(a)
    return a
  }
  const stats = async (a: AgentProcess): Promise<AgentStats> => await callAgent<AgentStats>(a.socket, 'GET', '/v1/stats')

  it('cold shoal run prints 42 and fetches about what the command opens, and under 10% of the image', async () => {
    const a = await agent('cold')
    const { stdout } = await execFileAsync(SHOAL_BIN, ['run', 'python', '--state', a.stateDir, '--', ...PYTHON_CMD])
    assert.equal(stdout.trim(), '42')
    const fromOrigin = (await stats(a)).sources.origin!.bytes
    const opened = sumSizes(await openedFiles(fixtures.unpacked.python, ['/usr/bin/env', 'PYTHONDONTWRITEBYTECODE=1', ...PYTHON_CMD]))
    const imageBytes = python.layers.reduce((n, l) => n + l.contentBytes, 0)
    process.stderr.write(`origin ${fromOrigin} bytes, opened files ${opened} bytes, image ${imageBytes} bytes\n`)
    assert.ok(opened > 1e6, `strace saw ${opened} bytes of opened files`)
    assert.ok(fromOrigin <= 1.5 * opened, `origin sent ${fromOrigin} bytes for ${opened} bytes of opened files`)
    assert.ok(fromOrigin <= 0.1 * imageBytes, `origin sent ${fromOrigin} of ${imageBytes} image bytes`)

    const metrics = await (await fetch(a.ready.metrics!)).text()
    const exported = Number(/^shoal_chunk_bytes_total\{source="origin"\} (\d+)/m.exec(metrics)?.[1])
    assert.equal(exported, fromOrigin, 'Prometheus reports the same origin bytes as shoal stats')
  })

  it('runs with chroot when asked (the fallback when no OCI runtime is installed)', async () => {
    const a = await agent('chroot')
    const { stdout } = await execFileAsync(SHOAL_BIN, ['run', 'python', '--state', a.stateDir, '--runtime', 'chroot', '--', ...PYTHON_CMD])
    assert.equal(stdout.trim(), '42')
  })

  it('the whole mounted tree equals umoci unpack; the second image then re-fetches none of the shared chunks', async () => {
    const a = await agent('full')
    const mnt = join(dir, 'mnt-python')
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: mnt })
    const expected = await snapshotDisk(fixtures.unpacked.python, { mtimes: true })
    const actual = await snapshotDisk(mnt, { mtimes: true }) // the agent is another process: async reads are safe
    assert.deepEqual(diffSnapshots(expected, actual), [])
    const afterPython = (await stats(a)).sources.origin!.chunks

    const mntPerl = join(dir, 'mnt-perl')
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'perl', mountpoint: mntPerl })
    assert.deepEqual(diffSnapshots(await snapshotDisk(fixtures.unpacked.perl), await snapshotDisk(mntPerl)), [])
    const perlOnly = perl.layers.reduce((n, l) => n + l.written.chunks, 0)
    // Plus five whole blobs that go through the resolver like chunks: the catalog of perl's own layer
    // (the base layer's is shared) and perl's manifest, signature manifest, signature envelope and config.
    assert.equal((await stats(a)).sources.origin!.chunks - afterPython, perlOnly + 5, 'only the chunks perl does not share with python come from the origin')
  })

  it('an agent killed with -9 leaves a dead mount that the restarted agent cleans up', async () => {
    const a = await agent('crash')
    const mnt = join(dir, 'mnt-crash')
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: mnt })
    assert.ok(await isFuseMount(mnt))
    a.child.kill('SIGKILL')
    await new Promise(resolve => a.child.once('exit', resolve))
    await assert.rejects(readFile(join(mnt, 'etc', 'hostname')), /ENOTCONN|transport endpoint/i)

    const b = await agent('crash') // same state dir
    assert.equal(await isFuseMount(mnt), false, 'the stale mount is gone after restart')
    await callAgent(b.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: mnt })
    assert.ok((await readFile(join(mnt, 'etc', 'os-release'), 'utf8')).includes('Debian'))
  })

  it('shoal run without a running agent runs one in-process for the command', async () => {
    const state = join(dir, 'inprocess')
    const { stdout, stderr } = await execFileAsync(SHOAL_BIN, ['run', 'python', '--state', state, '--origin', origin.url, '--trust', pub, '--no-p2p', '--summary', '--', ...PYTHON_CMD])
    assert.equal(stdout.trim(), '42')
    assert.match(stderr, /bytes by source: .*origin [1-9]/)
  })

  it('shoal trace records the start-up reads; an agent prefetches them after mount, so the run needs almost nothing more', async () => {
    const { stdout } = await execFileAsync(SHOAL_BIN, ['trace', `oci:${images}:python`, '--key', keyFile, '--tag', 'python-traced', '--', ...PYTHON_CMD])
    assert.match(stdout, /recorded \d+ files/)
    const a = await agent('prefetching')
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'python-traced', mountpoint: join(dir, 'mnt-traced') })
    let mounts: MountInfo[] = []
    for (let i = 0; i < 300 && mounts[0]?.prefetch.result === undefined; i++) {
      await new Promise(resolve => setTimeout(resolve, 100))
      mounts = await callAgent<MountInfo[]>(a.socket, 'GET', '/v1/mounts')
    }
    const prefetch = mounts[0]!.prefetch
    assert.ok(prefetch.result !== undefined, 'the prefetch list was fetched within 30 s')
    assert.ok(prefetch.chunks > 10 && prefetch.result.failed === 0, JSON.stringify(prefetch))
    const before = (await stats(a)).sources.origin!.bytes
    const run = await execFileAsync(SHOAL_BIN, ['run', 'python-traced', '--state', a.stateDir, '--', ...PYTHON_CMD])
    assert.equal(run.stdout.trim(), '42')
    const during = (await stats(a)).sources.origin!.bytes - before
    assert.ok(during <= 0.05 * before, `the run fetched ${during} more bytes after a prefetch of ${before}`)
  })

  it('a mount asked to prefetch first (as shoal run does) returns once the prefetch list is in the cache', async () => {
    // After the trace test above, which tagged python-traced.
    const a = await agent('prefetch-first')
    const info = await callAgent<MountInfo>(a.socket, 'POST', '/v1/mounts', { image: 'python-traced', mountpoint: join(dir, 'mnt-prefetch-first'), prefetchFirst: true })
    assert.ok(info.prefetch.chunks > 10, JSON.stringify(info.prefetch))
    assert.deepEqual(info.prefetch.result, { requested: info.prefetch.chunks, cached: 0, resolved: info.prefetch.chunks, failed: 0 })
    const before = (await stats(a)).sources.origin!.bytes
    const run = await execFileAsync(SHOAL_BIN, ['run', 'python-traced', '--state', a.stateDir, '--', ...PYTHON_CMD])
    assert.equal(run.stdout.trim(), '42')
    const during = (await stats(a)).sources.origin!.bytes - before
    assert.ok(during <= 0.05 * before, `the run fetched ${during} more bytes after a prefetch of ${before}`)
  })

  it('with --background-fetch, the rest of the image streams into the cache after mount; a later command fetches nothing', async () => {
    const a = await startAgentProcess(join(dir, 'background'), ['--origin', origin.url, '--trust', pub, '--no-p2p', '--log-level', 'warn', '--background-fetch'])
    agents.push(a)
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'perl', mountpoint: join(dir, 'mnt-background') })
    let mounts: MountInfo[] = []
    for (let i = 0; i < 600 && mounts[0]?.background === undefined; i++) {
      await new Promise(resolve => setTimeout(resolve, 100))
      mounts = await callAgent<MountInfo[]>(a.socket, 'GET', '/v1/mounts')
    }
    const background = mounts[0]!.background
    assert.ok(background?.complete === true && background.failed === 0 && background.resolved > 100, JSON.stringify(background))
    const before = (await stats(a)).sources.origin!.bytes
    const run = await execFileAsync(SHOAL_BIN, ['run', 'perl', '--state', a.stateDir, '--', 'sh', '-c', 'cat /usr/bin/perl* /usr/lib/x86_64-linux-gnu/*.so* | wc -c'])
    assert.match(run.stdout.trim(), /^\d{6,}$/)
    assert.equal((await stats(a)).sources.origin!.bytes - before, 0, 'every chunk was in the cache already')
  })

  it('refuses an image signed by an untrusted key, with a clear message', async () => {
    const other = join(dir, 'other.pub')
    await writeFile(other, generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'pem' }))
    const a = await startAgentProcess(join(dir, 'untrusting'), ['--origin', origin.url, '--trust', other, '--no-p2p', '--log-level', 'error'])
    agents.push(a)
    await assert.rejects(callAgent(a.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: join(dir, 'mnt-untrusted') }), /not signed by a trusted key/)
  })
})
