/**
 * The shoal snapshotter under a real containerd 1.6 and its CRI plugin, driven as a
 * kubelet drives it: Debian's docker-registry holds the original python and perl
 * images (pushed with skopeo) and their shoal conversions (`shoal convert
 * docker://… docker://…`); pods name the ORIGINAL images. Two nodes, each a
 * containerd with a `shoal agent --snapshotter-socket` beside it (state apart,
 * peers on loopback).
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { open, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN, startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import type { AgentStats } from '../../src/agent/agent.ts'
import { chainId } from '../../src/agent/lazy-layers.ts'
import { callAgent } from '../../src/agent/control.ts'
import { ensureRealFixtures, type RealFixtures } from '../../scripts/fixtures/debian-images.ts'
import type { Digest } from '../../src/oci/digest.ts'
import type { ShoalImageConfig } from '../../src/format/image-config.ts'
import { isFuseMount } from '../../src/fs/stale-mount.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import type { ImageConfig, ImageManifest } from '../../src/oci/types.ts'
import { startContainerd, type Containerd } from '../helpers/containerd/containerd.ts'
import { pushSandboxImage } from '../helpers/containerd/sandbox-image.ts'
import { runTool } from '../helpers/exec.ts'
import { openedFiles, sumSizes } from '../helpers/opened-files.ts'
import { tempDir } from '../helpers/tmp.ts'
import { skopeoCopy, startRegistry, type RegistryRequest, type TestRegistry } from '../registry/helpers.ts'

const execFileAsync = promisify(execFile)
const PYTHON = ['python3', '-c', 'import json, sqlite3; print(json.dumps({"answer": 42}))']
const PERL = ['perl', '-MJSON::PP', '-e', 'print encode_json({answer => 42}), "\\n"']

const dir = await tempDir('shoal-snap-')

interface Node { name: string, agent: AgentProcess, containerd: Containerd, socket: string, log: string, state: string }

/** The original image's layer blob digests and diffIDs, from the fixture layout. */
async function originalLayers (fixtures: RealFixtures, tag: 'python' | 'perl' | 'base'): Promise<{ blobs: Digest[], diffIds: Digest[] }> {
  const layout = await OciLayout.open(fixtures.layoutDir)
  const manifest = JSON.parse((await layout.readBlob((await layout.resolveTag(tag)).digest)).toString()) as ImageManifest
  const config = JSON.parse((await layout.readBlob(manifest.config.digest)).toString()) as ImageConfig
  return { blobs: manifest.layers.map(l => l.digest), diffIds: config.rootfs.diff_ids as Digest[] }
}

/** A shoal image's config, read from the registry through `shoal inspect --json`-free plumbing: the registry's own API. */
async function shoalConfig (registry: TestRegistry, repo: string, tag: string): Promise<ShoalImageConfig> {
  const accept = { accept: 'application/vnd.oci.image.manifest.v1+json' }
  const manifest = await (await fetch(`${registry.url}/v2/${repo}/manifests/${tag}`, { headers: accept })).json() as ImageManifest
  return await (await fetch(`${registry.url}/v2/${repo}/blobs/${manifest.config.digest}`)).json() as ShoalImageConfig
}

const blobGets = (requests: RegistryRequest[]): string[] => requests.filter(r => r.method === 'GET' && r.path.includes('/blobs/')).map(r => r.path)

describe('containerd with the shoal snapshotter', () => {
  let registry: TestRegistry
  let fixtures: RealFixtures
  let sandboxImage: string
  let pub: string
  const nodes: Node[] = []

  async function startNode (name: string, extra: string[] = []): Promise<Node> {
    const state = join(dir, name, 'agent')
    const socket = join(dir, name, 'snap.sock')
    const log = join(dir, name, 'agent.log')
    await runTool('mkdir', ['-p', join(dir, name)])
    const fd = await open(log, 'a')
    const agent = await startAgentProcess(state, ['--trust', pub, '--snapshotter-socket', socket, '--listen', '/ip4/127.0.0.1/tcp/0', '--metrics', 'off', '--log-level', 'info', ...extra], { stderr: fd.fd })
    await fd.close()
    const existing = nodes.find(n => n.name === name)
    const containerd = existing?.containerd ?? await startContainerd({ dir: join(dir, name, 'containerd'), sandboxImage, snapshotter: { name: 'shoal', socket }, registryHosts: [registry.host] })
    const node = { name, agent, containerd, socket, log, state }
    if (existing !== undefined) nodes.splice(nodes.indexOf(existing), 1, node)
    else nodes.push(node)
    return node
  }

  const stats = async (node: Node): Promise<AgentStats> => await callAgent<AgentStats>(node.agent.socket, 'GET', '/v1/stats')

  async function runIn (node: Node, image: string, command: string[]): Promise<{ stdout: string, requests: RegistryRequest[], pullMs: number }> {
    const seen = registry.requests().length
    const result = await node.containerd.runPod({ image, command, exitTimeoutMs: 120_000 })
    const context = `stderr: ${result.stderr}\nreason: ${result.reason} ${result.message}\ncontainerd:\n${await node.containerd.logTail(30)}\nagent:\n${(await readFile(node.log, 'utf8')).split('\n').slice(-30).join('\n')}`
    assert.equal(result.exitCode, 0, context)
    return { stdout: result.stdout, requests: registry.requests().slice(seen), pullMs: result.timings.pullMs }
  }

  /** The snapshots containerd's metadata lists for the shoal snapshotter (by name: chainIDs for committed layers). */
  async function snapshotNames (node: Node): Promise<string> {
    const { stdout } = await runTool('ctr', ['--address', node.containerd.socket, '-n', 'k8s.io', 'snapshots', '--snapshotter', 'shoal', 'ls'])
    return stdout
  }

  before(async () => {
    fixtures = await ensureRealFixtures()
    registry = await startRegistry({ dir: join(dir, 'registry'), accessLog: true })
    await skopeoCopy(fixtures.ref('python'), `docker://${registry.host}/python:3`)
    await skopeoCopy(fixtures.ref('perl'), `docker://${registry.host}/perl:5`)
    await skopeoCopy(fixtures.ref('base'), `docker://${registry.host}/plain:1`)
    await skopeoCopy(fixtures.ref('perl'), `docker://${registry.host}/untrusted/perl:5`)
    sandboxImage = await pushSandboxImage(registry.host, join(dir, 'pause'))
    await generateKeys(join(dir, 'keys'))
    await generateKeys(join(dir, 'other-keys'))
    pub = join(dir, 'keys', 'shoal.pub')
    for (const [src, key] of [['python:3', 'keys'], ['perl:5', 'keys'], ['untrusted/perl:5', 'other-keys']] as const) {
      await execFileAsync(SHOAL_BIN, ['convert', `docker://${registry.host}/${src}`, `docker://${registry.host}/${src}-shoal`, '--key', join(dir, key, 'shoal.key'), '--plain-http'])
    }
    const a = await startNode('a')
    await startNode('b', ['--peer', a.agent.ready.multiaddrs![0]!])
  }, { timeout: 900_000 })

  after(async () => {
    const errors: unknown[] = []
    for (const n of nodes) await n.containerd.stop().catch(err => { errors.push(err) })
    for (const n of nodes) await n.agent.stop().catch(err => { errors.push(err) })
    await registry?.stop().catch(err => { errors.push(err) })
    for (const n of nodes) {
      const left = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter(l => l.includes(n.state))
      if (left.length > 0) errors.push(new Error(`mounts left under ${n.state}:\n${left.join('\n')}`))
    }
    if (errors.length > 0) throw new AggregateError(errors, 'teardown failed')
  }, { timeout: 120_000 })

  test('a pod naming the original python image starts lazily: no original layer blob is downloaded', { timeout: 300_000 }, async () => {
    const a = nodes[0]!
    const before = await stats(a)
    const { stdout, requests } = await runIn(a, `${registry.host}/python:3`, PYTHON)
    assert.equal(stdout, '{"answer": 42}\n')
    const original = await originalLayers(fixtures, 'python')
    const gets = blobGets(requests)
    for (const blob of original.blobs) assert.ok(!gets.some(p => p.endsWith(blob)), `containerd downloaded original layer ${blob}: ${gets.join(', ')}`)
    const after = await stats(a)
    assert.equal(after.snapshotter!.lazy - before.snapshotter!.lazy, original.blobs.length, `lazy layers; fallbacks ${JSON.stringify(after.snapshotter!.fallbacks)}`)
    const read = after.snapshotter!.bytesRead
    const origin = after.sources.origin!.bytes - (before.sources.origin?.bytes ?? 0)
    const opened = sumSizes(await openedFiles(fixtures.unpacked.python, ['/usr/bin/env', 'PYTHONDONTWRITEBYTECODE=1', ...PYTHON]))
    process.stderr.write(`# python through the snapshotter: the command opens ${opened} bytes of files, ${read} bytes read through FUSE, ${origin} bytes from the registry (chunks, catalogs, metadata), ${gets.length} blob GETs\n`)
    assert.ok(opened > 1e6, `strace saw ${opened} bytes of opened files`)
    assert.ok(origin <= 1.5 * opened, `origin bytes ${origin} > 1.5 x the ${opened} bytes of files the command opens`)
  })

  test('perl after python: the shared base layer is neither downloaded nor mounted again, only read further', { timeout: 300_000 }, async () => {
    const a = nodes[0]!
    const before = await stats(a)
    const base = await shoalConfig(registry, 'python', '3-shoal').then(c => c.layers[0]!)
    const { stdout, requests } = await runIn(a, `${registry.host}/perl:5`, PERL)
    assert.equal(stdout, '{"answer":42}\n')
    const after = await stats(a)
    assert.equal(after.snapshotter!.lazy - before.snapshotter!.lazy, 1, 'only perl\'s own layer is new')
    assert.equal(after.snapshotter!.mounted - before.snapshotter!.mounted, 1)
    // Chunks of the base layer that perl reads first come from its packs (range reads); its catalog is not fetched again.
    const gets = blobGets(requests)
    for (const blob of [base.catalog.digest, ...(await originalLayers(fixtures, 'perl')).blobs]) {
      assert.ok(!gets.some(p => p.endsWith(blob)), `${blob} was fetched again: ${gets.join(', ')}`)
    }
  })

  test('an image with no conversion runs through the same snapshotter, downloaded; removing it lets containerd\'s GC remove its snapshots', { timeout: 300_000 }, async () => {
    const b = nodes[1]!
    const { stdout, requests } = await runIn(b, `${registry.host}/plain:1`, ['cat', '/etc/debian_version'])
    assert.match(stdout, /^12\.\d+\n$/)
    const plain = await originalLayers(fixtures, 'base')
    assert.ok(blobGets(requests).some(p => p.endsWith(plain.blobs[0]!)), 'the layer was downloaded')
    assert.ok(((await stats(b)).snapshotter!.fallbacks['no-conversion'] ?? 0) >= 1)
    const chain = chainId(plain.diffIds)
    assert.match(await snapshotNames(b), new RegExp(chain.slice(7)))
    await b.containerd.criClient.removeImage(`${registry.host}/plain:1`)
    // CRI's RemoveImage deletes synchronously, which runs containerd's garbage collector.
    await waitFor(async () => !(await snapshotNames(b)).includes(chain.slice(7)), 'the snapshot to be removed')
  })

  test('a second node gets the chunks from the first node\'s agent, not the registry', { timeout: 300_000 }, async () => {
    const b = nodes[1]!
    const before = await stats(b)
    const { stdout } = await runIn(b, `${registry.host}/python:3`, PYTHON)
    assert.equal(stdout, '{"answer": 42}\n')
    const after = await stats(b)
    const peers = (after.sources.peers?.bytes ?? 0) - (before.sources.peers?.bytes ?? 0)
    const origin = (after.sources.origin?.bytes ?? 0) - (before.sources.origin?.bytes ?? 0)
    process.stderr.write(`# node b: ${peers} bytes from peers, ${origin} from the registry\n`)
    assert.ok(peers > 1e6, `peers gave ${peers} bytes`)
    assert.ok(origin < peers / 10, `the registry gave ${origin} bytes, peers ${peers}`)
  })

  test('an agent killed with -9 and started again: a new container from the same image starts and reads the restored layers', { timeout: 300_000 }, async () => {
    const a = nodes[0]!
    a.agent.child.kill('SIGKILL')
    await new Promise(resolve => a.agent.child.once('exit', resolve))
    const restarted = await startNode('a')
    // containerd's client reconnects to the new socket on its own (with backoff); kubelet would retry a pull meanwhile.
    await waitFor(async () => await snapshotNames(restarted).then(() => true, () => false), 'containerd to reach the restarted snapshotter')
    const { stdout, requests } = await runIn(restarted, `${registry.host}/python:3`, ['python3', '-c', 'import hashlib, email.mime.text; print(hashlib.sha256(open("/usr/bin/python3", "rb").read()).hexdigest()[:12])'])
    assert.match(stdout, /^[0-9a-f]{12}\n$/)
    const gets = blobGets(requests)
    for (const blob of (await originalLayers(fixtures, 'python')).blobs) assert.ok(!gets.some(p => p.endsWith(blob)), `containerd downloaded original layer ${blob}`)
    const s = await stats(restarted)
    assert.ok(s.snapshotter!.mounted >= 3, `restored layers mounted: ${s.snapshotter!.mounted}`)
    assert.ok(s.snapshotter!.bytesRead > 0, 'the new container read through the restored mounts')
  })

  test('a conversion signed by an unknown key: the pod runs from the ordinary download, and the agent says why', { timeout: 300_000 }, async () => {
    // Node b has python's layers, not perl's own (node a has it from perl:5, the same chainID).
    const b = nodes[1]!
    const before = (await stats(b)).snapshotter!.fallbacks.signature ?? 0
    const { stdout, requests } = await runIn(b, `${registry.host}/untrusted/perl:5`, PERL)
    assert.equal(stdout, '{"answer":42}\n')
    const perlLayer = (await originalLayers(fixtures, 'perl')).blobs.at(-1)!
    assert.ok(blobGets(requests).some(p => p.endsWith(perlLayer)), 'perl\'s layer was downloaded')
    assert.ok(((await stats(b)).snapshotter!.fallbacks.signature ?? 0) > before)
    assert.match(await readFile(b.log, 'utf8'), /"reason":"signature".*layer not lazy: containerd downloads it/)
  })

  test('removing the images and running containerd\'s GC removes the lazy snapshots and unmounts them', { timeout: 300_000 }, async () => {
    const a = nodes[0]!
    const lazyDirs = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter(l => l.includes(join(a.state, 'snapshotter')) && l.includes('fuse')).length
    assert.ok(lazyDirs >= 3, `${lazyDirs} lazy mounts before`)
    for (const image of ['python:3', 'perl:5']) await a.containerd.criClient.removeImage(`${registry.host}/${image}`)
    await waitFor(async () => (await stats(a)).snapshotter!.mounted === 0, 'every lazy layer to be unmounted')
    const left = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter(l => l.includes(join(a.state, 'snapshotter')) && l.includes('fuse'))
    assert.deepEqual(left, [])
    assert.equal(await isFuseMount(join(a.state, 'snapshotter')), false)
  })
})

async function waitFor (check: () => Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 200))
  }
}
