/**
 * Agent.start builds a node's parts in order (src/agent/parts.ts): a part that
 * fails to start must leave nothing of the parts before it behind — no libp2p
 * node or listening socket, no metrics server, no open SQLite or cache file, no
 * snapshotter socket, no mount — so that the next start on the same state dir works.
 */
import assert from 'node:assert/strict'
import { mkdir, readdir, readFile, readlink, rmdir } from 'node:fs/promises'
import { connect } from 'node:net'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { Agent } from '../../src/agent/agent.ts'
import { defaultConfig, validateConfig, type AgentConfig } from '../../src/agent/config.ts'
import { controlSocketPath } from '../../src/agent/control.ts'
import { Parts } from '../../src/agent/parts.ts'
import type { Logger } from '../../src/util/log.ts'
import { silentLogger } from '../../src/util/log.ts'
import { tempDir } from '../helpers/tmp.ts'
import { helloImage } from './helpers.ts'

/** What this process holds open: its descriptors (files by path, sockets counted) and libuv's handles by kind. */
async function held (): Promise<{ files: string[], sockets: number, handles: Record<string, number> }> {
  const files: string[] = []
  let sockets = 0
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(join('/proc/self/fd', fd)).catch(() => '')
    if (target.startsWith('socket:')) sockets++
    else if (target.startsWith('/')) files.push(target)
  }
  const handles: Record<string, number> = {}
  for (const kind of process.getActiveResourcesInfo()) if (kind !== 'Timeout' && kind !== 'FSReqPromise' && kind !== 'FSReqCallback') handles[kind] = (handles[kind] ?? 0) + 1
  return { files, sockets, handles }
}

/** A log that keeps what it was told (the peer node logs its addresses when it starts). */
function recordingLog (): { log: Logger, lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = []
  const keep = (fields: object, msg: string): void => { lines.push({ ...fields, msg }) }
  return { log: { debug: keep, info: keep, warn: keep, error: keep }, lines }
}

async function refuses (port: number): Promise<boolean> {
  return await new Promise(resolve => {
    const socket = connect(port, '127.0.0.1')
    socket.once('connect', () => { socket.destroy(); resolve(false) })
    socket.once('error', () => resolve(true))
  })
}

/** A state dir with a cached image (so the index opens a catalog) and a config using every part. */
async function setUp (): Promise<{ dir: string, config: AgentConfig }> {
  const dir = await tempDir()
  const { images, pub } = await helloImage(dir)
  const config = validateConfig({
    ...defaultConfig(join(dir, 'state')),
    origins: [images],
    trust: [pub],
    metrics: '127.0.0.1:0',
    p2p: { enabled: true, listen: ['/ip4/127.0.0.1/tcp/0'], peers: [] }
  })
  // Mount once, so that the state dir has a catalog, cache files and a peer key for the next starts.
  const agent = await Agent.start(config, { control: false })
  try {
    await agent.mount('t', join(dir, 'mnt'))
  } finally {
    await agent.stop()
  }
  return { dir, config }
}

async function assertNothingLeft (before: Awaited<ReturnType<typeof held>>, dir: string): Promise<void> {
  // libp2p and gRPC close some sockets a tick after their stop resolves.
  let after = await held()
  for (let i = 0; i < 50 && (after.sockets > before.sockets || JSON.stringify(after.handles) !== JSON.stringify(before.handles)); i++) {
    await new Promise(resolve => setTimeout(resolve, 100))
    after = await held()
  }
  assert.deepEqual(after.files.filter(f => f.startsWith(dir)), [], 'no file of the state dir is left open (SQLite, cache, catalogs)')
  assert.equal(after.sockets, before.sockets, 'no socket left open')
  assert.deepEqual(after.handles, before.handles, 'no server or socket handle left')
  const mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter(line => line.includes(dir))
  assert.deepEqual(mounts, [], 'no mount left')
}

describe('a failure part-way through Agent.start', () => {
  it('at the last part (the control socket) closes everything started before it, snapshotter and libp2p included', async () => {
    const { dir, config } = await setUp()
    const withAll = { ...config, snapshotterSocket: join(dir, 'run', 'snapshotter.sock') }
    // A directory where the control socket goes: the last part cannot start.
    await mkdir(controlSocketPath(config.stateDir))
    const before = await held()
    const { log, lines } = recordingLog()
    await assert.rejects(Agent.start(withAll, { log }))
    const started = lines.find(l => l.msg === 'peer node started')
    assert.ok(started !== undefined, 'the libp2p node had started')
    await assertNothingLeft(before, dir)
    const port = Number(/\/tcp\/(\d+)/.exec(String((started.multiaddrs as string[])[0]))![1])
    assert.ok(await refuses(port), 'the libp2p port is closed')
    await assert.rejects(new Promise((resolve, reject) => { const s = connect(withAll.snapshotterSocket); s.once('connect', () => { s.destroy(); resolve(undefined) }); s.once('error', reject) }), 'the snapshotter socket is closed')
    // And the state dir is fit for the next start.
    await rmdir(controlSocketPath(config.stateDir))
    const agent = await Agent.start(withAll, { log: silentLogger })
    try {
      assert.equal(agent.lazyLayers !== undefined && agent.peering !== undefined, true)
      assert.ok(agent.index.stats.catalogs >= 1, 'the cached catalog is indexed')
    } finally {
      await agent.stop()
    }
    await assertNothingLeft(before, dir)
  })

  it('at peering (an unusable listen address) closes the lag monitor, the cache and the index', async () => {
    const { dir, config } = await setUp()
    const before = await held()
    // TEST-NET-3: no interface of this machine has it.
    await assert.rejects(Agent.start({ ...config, p2p: { ...config.p2p, listen: ['/ip4/203.0.113.7/tcp/0'] } }, { control: false }))
    await assertNothingLeft(before, dir)
  })
})

describe('Parts', () => {
  it('closes in reverse order on stop, once, and past a closer that fails', async () => {
    const closed: string[] = []
    const parts = new Parts(silentLogger)
    for (const name of ['a', 'b', 'c']) await parts.start(name, () => name, n => { closed.push(n); if (n === 'b') throw new Error('b will not close') })
    assert.deepEqual(parts.names, ['a', 'b', 'c'])
    await Promise.all([parts.stop(), parts.stop()])
    assert.deepEqual(closed, ['c', 'b', 'a'])
    await parts.stop()
    assert.deepEqual(closed, ['c', 'b', 'a'])
    await assert.rejects(parts.start('d', () => 'd', () => {}), /stopping/)
  })

  it('a part that fails to start is not closed (it cleans up after itself); the ones before it are, by the caller\'s stop', async () => {
    const closed: string[] = []
    const parts = new Parts(silentLogger)
    await parts.start('a', () => 'a', n => { closed.push(n) })
    await assert.rejects(parts.start('b', async () => { throw new Error('no') }, () => { closed.push('b') }))
    await parts.stop()
    assert.deepEqual(closed, ['a'])
  })

  it('a part that finishes starting while the node stops is closed, not handed out', async () => {
    const closed: string[] = []
    const parts = new Parts(silentLogger)
    let finish!: () => void
    const starting = parts.start('slow', async () => { await new Promise<void>(resolve => { finish = resolve }); return 'slow' }, n => { closed.push(n) })
    const stopping = parts.stop()
    finish()
    await assert.rejects(starting, /while the node was stopping/)
    await stopping
    assert.deepEqual(closed, ['slow'])
  })
})
