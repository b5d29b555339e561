/**
 * The remote-layer path of Prepare over gRPC, with a fake RemoteLayers that
 * bind-mounts prepared directories: what containerd 1.6's metadata layer does on
 * a pull (Prepare with `containerd.io/snapshot.ref`, then List with its filter),
 * restore on restart, release on remove and close, and the fallbacks.
 */
import assert from 'node:assert/strict'
import { access, readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import * as grpc from '@grpc/grpc-js'
import { tempDir } from '../helpers/tmp.ts'
import { FakeRemoteLayers, isMountpoint, startHarness, statusOf, TARGET_LABEL, withMounted, type Harness } from './helpers.ts'

const COMMITTED = 3
const ACTIVE = 2

/** The filter containerd 1.6's metadata snapshotter sends after ALREADY_EXISTS (Go's %q for the parent). */
function containerdFilter (target: string, parent: string): string {
  return `labels."containerd.io/snapshot.ref"==${target},parent==${JSON.stringify(parent)}`
}

async function setup (options: { callTimeoutMs?: number } = {}): Promise<{ h: Harness, fake: FakeRemoteLayers, base: string }> {
  const base = await tempDir('shoal-snap-remote-')
  const fake = new FakeRemoteLayers(join(base, 'layers'))
  const h = await startHarness({ root: join(base, 'root'), remote: fake, serve: { callTimeoutMs: options.callTimeoutMs } })
  return { h, fake, base }
}

/** The layer's fs dir the fake was asked to mount into for TARGET. */
function dirOf (fake: FakeRemoteLayers, target: string): string {
  const request = fake.prepared.find(p => p.target === target)
  assert.ok(request !== undefined, `no prepare for ${target}`)
  return request.dir
}

async function exists (path: string): Promise<boolean> {
  return await access(path).then(() => true, () => false)
}

async function until (what: string, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 10_000
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
}

describe('remote layers', () => {
  it('answers ALREADY_EXISTS with a committed target that containerd finds with its filter and can build on', async () => {
    const { h, fake } = await setup()
    try {
      await fake.add('sha256:aaa', { 'hello.txt': 'from the remote layer' })
      await fake.add('sha256:bbb', { 'second.txt': 'second layer' })
      const labels = { [TARGET_LABEL]: 'sha256:aaa', 'containerd.io/snapshot/cri.layer-digest': 'sha256:blob-a' }

      const err = await statusOf(h.client.prepare('default/1/extract-1 sha256:aaa', '', labels))
      assert.equal(err.code, grpc.status.ALREADY_EXISTS)
      assert.match(err.details, /target snapshot "sha256:aaa" already exists/)
      assert.equal(fake.prepared.length, 1)
      assert.deepEqual({ ...fake.prepared[0], dir: undefined }, { key: 'default/1/extract-1 sha256:aaa', parent: '', target: 'sha256:aaa', labels, dir: undefined })
      const dirA = dirOf(fake, 'sha256:aaa')
      assert.match(dirA, /\/snapshots\/\d+\/fs$/)
      assert.ok(await isMountpoint(dirA), 'the layer is mounted in the snapshot\'s fs dir')
      assert.equal((await statusOf(h.client.stat('default/1/extract-1 sha256:aaa'))).code, grpc.status.NOT_FOUND, 'the active key is never created')

      const found = (await h.client.list([containerdFilter('sha256:aaa', '')])).infos
      assert.equal(found.length, 1)
      assert.equal(found[0]!.name, 'sha256:aaa')
      assert.equal(found[0]!.kind, COMMITTED)
      assert.equal(found[0]!.parent, '')
      assert.deepEqual(found[0]!.labels, labels)
      assert.deepEqual(await h.client.usage('sha256:aaa'), { size: fake.layer('sha256:aaa')!.size, inodes: fake.layer('sha256:aaa')!.inodes })

      // The next layer names the first as its parent, as containerd does with the backend name.
      const errB = await statusOf(h.client.prepare('default/2/extract-2 sha256:bbb', 'sha256:aaa', { [TARGET_LABEL]: 'sha256:bbb' }))
      assert.equal(errB.code, grpc.status.ALREADY_EXISTS)
      assert.equal((await h.client.list([containerdFilter('sha256:bbb', 'sha256:aaa')])).infos.length, 1)
      assert.equal((await h.client.list([containerdFilter('sha256:bbb', '')])).infos.length, 0, 'the parent is part of the match')
      const dirB = dirOf(fake, 'sha256:bbb')

      // A container's rootfs on the remote layers: overlay with both as lower dirs.
      const rootfs = await h.client.prepare('ctr-rootfs', 'sha256:bbb')
      assert.equal(rootfs[0]!.type, 'overlay')
      assert.ok(rootfs[0]!.options.includes(`lowerdir=${dirB}:${dirA}`))
      await withMounted(rootfs, async dir => {
        assert.equal(await readFile(join(dir, 'hello.txt'), 'utf8'), 'from the remote layer')
        assert.equal(await readFile(join(dir, 'second.txt'), 'utf8'), 'second layer')
        await writeFile(join(dir, 'hello.txt'), 'changed in the container')
      })
      assert.equal(await readFile(join(dirA, 'hello.txt'), 'utf8'), 'from the remote layer', 'writes go to the upper dir')

      // Another pull of the same layer: no second mount.
      const again = await statusOf(h.client.prepare('default/3/extract-3 sha256:aaa', '', labels))
      assert.equal(again.code, grpc.status.ALREADY_EXISTS)
      assert.equal(fake.prepared.length, 2)

      // Garbage collection order: children first; removal unmounts before deleting.
      assert.equal((await statusOf(h.client.remove('sha256:aaa'))).code, grpc.status.FAILED_PRECONDITION)
      await h.client.remove('ctr-rootfs')
      await h.client.remove('sha256:bbb')
      assert.ok(fake.released.includes(dirB))
      assert.ok(!await isMountpoint(dirB))
      assert.ok(!await exists(join(dirB, '..')), 'the snapshot directory is gone')
      assert.ok(await exists(join(fake.sourceDir('sha256:bbb'), 'second.txt')), 'rm did not walk into the layer')
      await h.client.remove('sha256:aaa')
      assert.ok(!await isMountpoint(dirA))
      assert.deepEqual(await readdir(join(h.root, 'snapshots')), [])
    } finally {
      await h.stop()
    }
  })

  it('mounts a layer once when several Prepares for it arrive together', async () => {
    const { h, fake } = await setup()
    try {
      await fake.add('sha256:ccc', { f: 'c' })
      fake.delayMs = 200
      const errors = await Promise.all([1, 2, 3].map(async i => await statusOf(h.client.prepare(`default/${i}/extract sha256:ccc`, '', { [TARGET_LABEL]: 'sha256:ccc' }))))
      assert.deepEqual(errors.map(e => e.code), [grpc.status.ALREADY_EXISTS, grpc.status.ALREADY_EXISTS, grpc.status.ALREADY_EXISTS])
      assert.equal(fake.prepared.length, 1)
      assert.equal((await h.client.list()).infos.length, 1)
    } finally {
      await h.stop()
    }
  })

  it('mounts remote layers again on open, releases them on close, and keeps their records', async () => {
    const { h, fake, base } = await setup()
    await fake.add('sha256:ddd', { f: 'restored content' })
    let dir: string
    try {
      await statusOf(h.client.prepare('k', '', { [TARGET_LABEL]: 'sha256:ddd' }))
      dir = dirOf(fake, 'sha256:ddd')
    } finally {
      await h.stop()
    }
    assert.ok(fake.released.includes(dir), 'close releases the mount')
    assert.ok(!await isMountpoint(dir))

    const reopened = await startHarness({ root: join(base, 'root'), remote: fake })
    try {
      assert.deepEqual(fake.restored, [{ state: { target: 'sha256:ddd' }, dir }])
      assert.ok(await isMountpoint(dir))
      assert.equal((await reopened.client.stat('sha256:ddd')).kind, COMMITTED)
      await withMounted(await reopened.client.view('v', 'sha256:ddd'), async mnt => {
        assert.equal(await readFile(join(mnt, 'f'), 'utf8'), 'restored content')
      })
      await reopened.client.remove('v')
    } finally {
      await reopened.stop()
    }

    fake.failRestore = true
    const broken = await startHarness({ root: join(base, 'root'), remote: fake })
    try {
      assert.ok(broken.logs.some(l => l.level === 'warn' && /cannot mount remote layer again/.test(l.message)), 'a failed restore is logged')
      assert.equal((await broken.client.stat('sha256:ddd')).kind, COMMITTED, 'and the snapshot stays for containerd\'s GC')
      await broken.client.remove('sha256:ddd')
      assert.deepEqual(await readdir(join(base, 'root', 'snapshots')), [])
    } finally {
      await broken.stop()
    }
  })

  for (const mode of ['decline', 'throw'] as const) {
    it(`falls back to an ordinary snapshot when the remote layer ${mode === 'decline' ? 'declines' : 'fails'}`, async () => {
      const { h, fake } = await setup()
      try {
        await fake.add('sha256:eee', { f: 'e' })
        fake.mode = mode
        const mounts = await h.client.prepare('default/1/extract sha256:eee', '', { [TARGET_LABEL]: 'sha256:eee' })
        assert.deepEqual(mounts.map(m => [m.type, m.options]), [['bind', ['rw', 'rbind']]])
        assert.equal((await h.client.stat('default/1/extract sha256:eee')).kind, ACTIVE)
        assert.equal((await statusOf(h.client.stat('sha256:eee'))).code, grpc.status.NOT_FOUND)
        assert.equal(fake.prepared.length, 1)
        assert.ok(fake.released.includes(fake.prepared[0]!.dir), 'whatever was half-mounted is released')
        assert.equal((await readdir(join(h.root, 'snapshots'))).length, 1, 'the remote attempt left no directory')
        if (mode === 'throw') assert.ok(h.logs.some(l => l.level === 'warn' && /remote layer failed to prepare/.test(l.message)))
        // containerd then unpacks into the active snapshot and commits it under its own name.
        await withMounted(mounts, async dir => { await writeFile(join(dir, 'f'), 'downloaded') })
        await h.client.commit('default/2/sha256:eee', 'default/1/extract sha256:eee', { [TARGET_LABEL]: 'sha256:eee' })
        assert.equal((await h.client.list([containerdFilter('sha256:eee', '')])).infos[0]?.name, 'default/2/sha256:eee')
      } finally {
        await h.stop()
      }
    })
  }

  it('prepares an ordinary snapshot when the target exists on another parent', async () => {
    const { h, fake } = await setup()
    try {
      await fake.add('sha256:fff', { f: 'f' })
      await statusOf(h.client.prepare('k1', '', { [TARGET_LABEL]: 'sha256:fff' }))
      await h.client.prepare('other-a')
      await h.client.commit('other', 'other-a')
      // containerd would look for the target on "other" and fail the pull on ALREADY_EXISTS.
      const mounts = await h.client.prepare('k2', 'other', { [TARGET_LABEL]: 'sha256:fff' })
      assert.equal(mounts[0]!.type, 'overlay')
      assert.ok(mounts[0]!.options.some(o => o.startsWith('upperdir=')), 'an active snapshot to unpack into')
      assert.equal((await h.client.stat('k2')).kind, ACTIVE)
      assert.equal(fake.prepared.length, 1)
    } finally {
      await h.stop()
    }
  })

  it('fails a Prepare that outlives its deadline with DEADLINE_EXCEEDED and aborts the remote layer', async () => {
    const { h, fake } = await setup({ callTimeoutMs: 300 })
    try {
      fake.mode = 'hang'
      const started = Date.now()
      const err = await statusOf(h.client.prepare('k', '', { [TARGET_LABEL]: 'sha256:slow' }))
      assert.equal(err.code, grpc.status.DEADLINE_EXCEEDED)
      assert.match(err.details, /Prepare did not finish within 300 ms/)
      assert.ok(Date.now() - started < 5_000)
      assert.equal(fake.lastSignal?.aborted, true)
      await until('the abandoned directory is removed', async () => (await readdir(join(h.root, 'snapshots'))).length === 0)
      assert.equal((await h.client.list()).infos.length, 0)
    } finally {
      await h.stop()
    }
  })
})
