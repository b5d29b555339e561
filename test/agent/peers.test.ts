import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN, startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats } from '../../src/agent/agent.ts'
import { callAgent } from '../../src/agent/control.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { generatePsk } from '../../src/p2p/node.ts'
import { PEER_SOURCE_DEFAULTS } from '../../src/p2p/peer-source-defaults.ts'
import { startOriginServer, type OriginRequestLog, type OriginServer } from '../../src/origin/server.ts'
import { removeDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk } from '../helpers/tree-snapshot.ts'

const execFileAsync = promisify(execFile)
const PYTHON_CMD = ['python3', '-c', 'import json, sqlite3; print(42)']

describe('agents share chunks over libp2p', () => {
  let fixtures: RealFixtures
  let dir: string
  let origin: OriginServer
  const originLog: OriginRequestLog[] = []
  let pub: string
  const agents: AgentProcess[] = []

  before(async () => {
    fixtures = await ensureRealFixtures()
    dir = await mkdtemp(join(tmpdir(), 'shoal-peers-test-'))
    const keys = generateKeyPairSync('ed25519')
    pub = join(dir, 'shoal.pub')
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    await convertImage({ source: fixtures.ref('python'), dest: `oci:${join(dir, 'images')}:python`, signingKey: keys.privateKey })
    origin = await startOriginServer({ dir: join(dir, 'images'), log: entry => originLog.push(entry) })
  })
  after(async () => {
    await Promise.all(agents.map(a => a.stop()))
    await origin?.close()
    await removeDir(dir)
  })

  async function agent (name: string, extra: string[] = []): Promise<AgentProcess> {
    const a = await startAgentProcess(join(dir, name), ['--origin', origin.url, '--trust', pub, '--log-level', 'warn', ...extra])
    agents.push(a)
    return a
  }
  const stats = async (a: AgentProcess): Promise<AgentStats> => await callAgent<AgentStats>(a.socket, 'GET', '/v1/stats')
  const run = async (a: AgentProcess): Promise<string> => (await execFileAsync(SHOAL_BIN, ['run', 'python', '--state', a.stateDir, '--', ...PYTHON_CMD])).stdout.trim()

  it('after A ran the command, B gets every chunk and catalog from A: from the origin only tag lookups and the small metadata blobs', async () => {
    const a = await agent('a')
    const b = await agent('b', ['--peer', a.ready.multiaddrs![0]!])
    assert.equal(await run(a), '42')
    const seenBeforeB = originLog.length
    assert.equal(await run(b), '42')
    // In a swarm this small the manifest, the signature (its manifest and envelope) and the config (a few KB) come from the
    // origin without asking peers (PEER_SOURCE_DEFAULTS.directBlobBytes); catalogs and chunks from A.
    const blobs = originLog.slice(seenBeforeB).filter(e => e.path !== '/index.json')
    assert.ok(blobs.length <= 4, JSON.stringify(blobs))
    for (const e of blobs) assert.ok(e.path.startsWith('/blobs/') && e.bytes <= PEER_SOURCE_DEFAULTS.directBlobBytes, JSON.stringify(e))
    const sb = await stats(b)
    const fromOrigin = sb.sources.origin?.bytes ?? 0
    assert.equal(fromOrigin, blobs.reduce((n, e) => n + e.bytes, 0), JSON.stringify(sb.sources))
    assert.equal(sb.sources.peers!.bytes + fromOrigin, (await stats(a)).sources.origin!.bytes, 'B got from A and the origin together exactly what A got from the origin')
    assert.equal(sb.peer!.source.verificationFailures, 0)
  })

  it('a peer killed while serving: the reader finishes from the origin, content intact', async () => {
    const a = await agent('serving')
    const mntA = join(dir, 'mnt-serving')
    await callAgent(a.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: mntA })
    // A part of the image keeps the test short: the python standard library, about 40 MB.
    const subtree = 'usr/lib/python3.11'
    await snapshotDisk(join(mntA, subtree)) // A now holds all of it
    const b = await agent('reader', ['--peer', a.ready.multiaddrs![0]!, '--chunk-timeout', '15000'])
    const mntB = join(dir, 'mnt-reader')
    await callAgent(b.socket, 'POST', '/v1/mounts', { image: 'python', mountpoint: mntB })
    const reading = snapshotDisk(join(mntB, subtree))
    // Kill A once B has some bytes from it.
    for (let i = 0; i < 200 && ((await stats(b)).sources.peers?.bytes ?? 0) === 0; i++) await new Promise(resolve => setTimeout(resolve, 25))
    a.child.kill('SIGKILL')
    const started = performance.now()
    const tree = await reading
    const seconds = (performance.now() - started) / 1000
    assert.deepEqual(diffSnapshots(await snapshotDisk(join(fixtures.unpacked.python, subtree)), tree), [])
    const s = await stats(b)
    assert.ok(s.sources.peers!.bytes > 0 && s.sources.origin!.bytes > 0, JSON.stringify(s.sources))
    assert.equal(s.unavailable, 0)
    process.stderr.write(`finished ${seconds.toFixed(1)} s after the peer was killed\n`)
  })

  it('a node without the pre-shared key gets nothing from the swarm; one with it does', async () => {
    const psk = join(dir, 'swarm.key')
    await writeFile(psk, generatePsk(), { mode: 0o600 })
    const a = await agent('psk-a', ['--psk', psk])
    assert.equal(await run(a), '42')
    const outsider = await agent('psk-outsider', ['--peer', a.ready.multiaddrs![0]!])
    const insider = await agent('psk-insider', ['--psk', psk, '--peer', a.ready.multiaddrs![0]!])
    assert.equal(await run(outsider), '42')
    assert.equal(await run(insider), '42')
    const so = await stats(outsider)
    assert.equal(so.peer!.connectedPeers, 0)
    assert.equal(so.sources.peers?.bytes ?? 0, 0)
    assert.ok(so.sources.origin!.bytes > 0)
    const si = await stats(insider)
    // Only the small metadata blobs from the origin (see above); every chunk and catalog from the swarm.
    assert.ok((si.sources.origin?.bytes ?? 0) <= 4 * PEER_SOURCE_DEFAULTS.directBlobBytes, JSON.stringify(si.sources))
    assert.ok(si.sources.peers!.bytes > 0, JSON.stringify(si.sources))
  })
})
