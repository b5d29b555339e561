import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN, startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats } from '../../src/agent/agent.ts'
import { callAgent } from '../../src/agent/control.ts'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { PEER_SOURCE_DEFAULTS } from '../../src/p2p/peer-source-defaults.ts'
import { tempDir } from '../helpers/tmp.ts'
import { makeHtpasswd, makeTlsFiles, skopeoCopy, startRegistry, type TestRegistry } from './helpers.ts'

const execFileAsync = promisify(execFile)
const PYTHON_CMD = ['python3', '-c', 'import json, sqlite3; print(42)']
const CREDS = 'bob:s3cret'

/**
 * The whole registry story: skopeo pushes the real python image to docker-registry
 * (TLS + htpasswd), shoal converts it registry → registry, two agents use the registry
 * as their origin, and the second gets its chunks from the first.
 */
const dir = await tempDir()

describe('two agents on a registry origin', () => {
  let registry: TestRegistry
  let caFile: string
  const agents: AgentProcess[] = []

  before(async () => {
    const fixtures = await ensureRealFixtures()
    const tls = await makeTlsFiles(dir)
    caFile = tls.caFile
    registry = await startRegistry({ dir: join(dir, 'registry'), tls, htpasswd: await makeHtpasswd(dir, 'bob', 's3cret') })
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/team/python:3`, { creds: CREDS })
  })
  after(async () => {
    await Promise.all(agents.map(a => a.stop()))
    await registry?.stop()
  })

  it('convert pushes the shoal image back; agent B runs python with its chunks from agent A, only small metadata from the registry', { timeout: 300_000 }, async () => {
    await generateKeys(join(dir, 'keys'))
    await execFileAsync(SHOAL_BIN, ['convert', `docker://${registry.host}/team/python:3`, `docker://${registry.host}/team/python:3-shoal`,
      '--key', join(dir, 'keys', 'shoal.key'), '--src-creds', CREDS, '--dest-creds', CREDS, '--ca', caFile])
    const verified = await execFileAsync(SHOAL_BIN, ['verify', `docker://${registry.host}/team/python:3-shoal`, '--trust', join(dir, 'keys', 'shoal.pub'), '--creds', CREDS, '--ca', caFile])
    assert.match(verified.stdout, /^OK /)
    const common = ['--origin', `docker://${registry.host}/team/python`, '--registry-creds', CREDS, '--registry-ca', caFile, '--trust', join(dir, 'keys', 'shoal.pub'), '--log-level', 'warn']
    const a = await startAgentProcess(join(dir, 'a'), common)
    agents.push(a)
    const b = await startAgentProcess(join(dir, 'b'), [...common, '--peer', a.ready.multiaddrs![0]!])
    agents.push(b)
    for (const agent of [a, b]) {
      const { stdout } = await execFileAsync(SHOAL_BIN, ['run', '3-shoal', '--state', agent.stateDir, '--', ...PYTHON_CMD])
      assert.equal(stdout.trim(), '42')
    }
    const [sa, sb] = await Promise.all([a, b].map(async agent => await callAgent<AgentStats>(agent.socket, 'GET', '/v1/stats')))
    process.stderr.write(`origin bytes: A ${sa!.sources.origin!.bytes}, B ${sb!.sources.origin!.bytes}; B from peers ${sb!.sources.peers!.bytes}\n`)
    assert.ok(sa!.sources.origin!.bytes > 1e6)
    // Every chunk and catalog from A; from the registry only the small metadata blobs (manifest,
    // signature, config), which a swarm this small reads from the origin (PEER_SOURCE_DEFAULTS.directBlobBytes).
    const fromRegistry = sb!.sources.origin?.bytes ?? 0
    assert.ok(fromRegistry <= 4 * PEER_SOURCE_DEFAULTS.directBlobBytes, JSON.stringify(sb!.sources))
    assert.equal(sb!.sources.peers!.bytes + fromRegistry, sa!.sources.origin!.bytes)
  })
})
