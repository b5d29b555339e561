/**
 * The snapshotter driven over gRPC on its unix socket, as containerd drives it,
 * checking what containerd's snapshots/testsuite checks that applies here: real
 * overlay and bind mounts of what Prepare/View return, commit chains, removal
 * order, labels, usage, List filters, error codes, persistence and Cleanup.
 */
import assert from 'node:assert/strict'
import { link, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import * as grpc from '@grpc/grpc-js'
import { runTool } from '../helpers/exec.ts'
import { tempDir } from '../helpers/tmp.ts'
import { startHarness, statusOf, withMounted, type Harness } from './helpers.ts'

const KIND = { view: 1, active: 2, committed: 3 }

/** Whether mount(8) can make an overlay in the temp dir: the tests below need it. */
async function checkOverlayWorks (): Promise<void> {
  const dir = await tempDir('shoal-overlay-check-')
  for (const sub of ['lower', 'upper', 'work', 'merged']) await mkdir(join(dir, sub))
  await writeFile(join(dir, 'lower', 'a'), 'a')
  await runTool('mount', ['-t', 'overlay', '-o', `lowerdir=${dir}/lower,upperdir=${dir}/upper,workdir=${dir}/work`, 'overlay', join(dir, 'merged')], { timeoutMs: 30_000 })
  try {
    assert.equal(await readFile(join(dir, 'merged', 'a'), 'utf8'), 'a')
  } finally {
    await runTool('umount', [join(dir, 'merged')], { timeoutMs: 30_000 })
  }
}

/** One snapshotter for the first suite; top level, so that it outlives the suite's hooks. */
const suiteDir = await tempDir('shoal-snap-suite-')

describe('snapshotter over gRPC', () => {
  let h: Harness
  before(async () => {
    await checkOverlayWorks()
    h = await startHarness({ root: join(suiteDir, 'root') })
  })
  after(async () => { await h.stop() })

  const fsOf = (id: number): string => join(h.root, 'snapshots', String(id), 'fs')

  it('prepares, commits and views a chain, with files written through real mounts', async () => {
    const first = await h.client.prepare('basic-1')
    assert.equal(first.length, 1)
    assert.equal(first[0]!.type, 'bind')
    assert.deepEqual(first[0]!.options, ['rw', 'rbind'])
    await withMounted(first, async dir => {
      assert.equal((await stat(dir)).mode & 0o777, 0o755, 'the root of a new snapshot is 0755')
      await writeFile(join(dir, 'foo'), 'foo\n')
      await mkdir(join(dir, 'a', 'b', 'c'), { recursive: true })
    })
    await h.client.commit('basic-c1', 'basic-1')
    const c1 = await h.client.stat('basic-c1')
    assert.equal(c1.kind, KIND.committed)
    assert.equal(c1.parent, '')
    assert.equal((await statusOf(h.client.stat('basic-1'))).code, grpc.status.NOT_FOUND, 'the active key is gone after commit')

    const second = await h.client.prepare('basic-2', 'basic-c1')
    assert.equal(second[0]!.type, 'overlay')
    await withMounted(second, async dir => {
      assert.equal(await readFile(join(dir, 'foo'), 'utf8'), 'foo\n')
      assert.ok((await stat(join(dir, 'a', 'b', 'c'))).isDirectory())
      await writeFile(join(dir, 'bar'), 'bar\n')
      await writeFile(join(dir, 'foo'), 'bar\n')
      await rm(join(dir, 'a', 'b'), { recursive: true })
    })
    const active = await h.client.stat('basic-2')
    assert.equal(active.kind, KIND.active)
    assert.equal(active.parent, 'basic-c1')
    await h.client.commit('basic-c2', 'basic-2')
    assert.equal((await h.client.stat('basic-c2')).parent, 'basic-c1')

    const view = await h.client.view('basic-view', 'basic-c2')
    assert.equal(view[0]!.type, 'overlay')
    assert.ok(!view[0]!.options.some(o => o.startsWith('upperdir=')), 'a view has no upper dir')
    await withMounted(view, async dir => {
      assert.equal(await readFile(join(dir, 'foo'), 'utf8'), 'bar\n')
      assert.equal(await readFile(join(dir, 'bar'), 'utf8'), 'bar\n')
      assert.deepEqual(await readdir(join(dir, 'a')), [], 'the removal in the upper layer hides a/b')
      await assert.rejects(writeFile(join(dir, 'new'), 'x'), (err: NodeJS.ErrnoException) => err.code === 'EROFS')
    })

    const withChild = await statusOf(h.client.remove('basic-c1'))
    assert.equal(withChild.code, grpc.status.FAILED_PRECONDITION)
    assert.match(withChild.details, /basic-c2.*remove the children first/)
    await h.client.remove('basic-view')
    await h.client.remove('basic-c2')
    await h.client.remove('basic-c1')
    assert.equal((await statusOf(h.client.stat('basic-c1'))).code, grpc.status.NOT_FOUND)
  })

  it('returns the mounts of containerd\'s overlay snapshotter', async () => {
    await h.client.prepare('m-a')
    await h.client.commit('m-c1', 'm-a')
    await h.client.prepare('m-b', 'm-c1')
    await h.client.commit('m-c2', 'm-b')
    const [c1, c2] = await Promise.all([idOf(h, 'm-c1'), idOf(h, 'm-c2')])

    const active = await h.client.prepare('m-active', 'm-c2')
    const id = await idOf(h, 'm-active')
    assert.deepEqual(active, [{
      type: 'overlay',
      source: 'overlay',
      target: '',
      options: ['index=off', `workdir=${join(h.root, 'snapshots', String(id), 'work')}`, `upperdir=${fsOf(id)}`, `lowerdir=${fsOf(c2)}:${fsOf(c1)}`]
    }])
    assert.deepEqual(await h.client.mounts('m-active'), active, 'Mounts repeats what Prepare returned')

    assert.deepEqual(await h.client.view('m-view-1', 'm-c1'), [{ type: 'bind', source: fsOf(c1), target: '', options: ['ro', 'rbind'] }],
      'a view of one layer binds that layer read-only')
    const empty = await h.client.view('m-view-0')
    assert.deepEqual(empty, [{ type: 'bind', source: fsOf(await idOf(h, 'm-view-0')), target: '', options: ['ro', 'rbind'] }])
    await withMounted(empty, async dir => { assert.deepEqual(await readdir(dir), []) })
    assert.deepEqual(await h.client.view('m-view-2', 'm-c2'), [{ type: 'overlay', source: 'overlay', target: '', options: ['index=off', `lowerdir=${fsOf(c2)}:${fsOf(c1)}`] }])

    assert.equal((await statusOf(h.client.mounts('m-c1'))).code, grpc.status.FAILED_PRECONDITION, 'a committed snapshot has no mounts')
  })

  it('answers with the error codes containerd expects', async () => {
    await h.client.prepare('e-a')
    await h.client.commit('e-c', 'e-a')
    await h.client.prepare('e-active', 'e-c')
    await h.client.view('e-view', 'e-c')

    const cases: Array<[string, () => Promise<unknown>, grpc.status, RegExp]> = [
      ['prepare an existing key', () => h.client.prepare('e-active', 'e-c'), grpc.status.ALREADY_EXISTS, /"e-active" already exists/],
      ['view an existing key', () => h.client.view('e-active', 'e-c'), grpc.status.ALREADY_EXISTS, /already exists/],
      ['a parent that does not exist', () => h.client.prepare('e-x', 'nope'), grpc.status.NOT_FOUND, /parent snapshot "nope" does not exist/],
      ['an active parent', () => h.client.prepare('e-y', 'e-active'), grpc.status.INVALID_ARGUMENT, /not committed/],
      ['an empty key', () => h.client.prepare(''), grpc.status.INVALID_ARGUMENT, /key is empty/],
      ['commit a view', () => h.client.commit('e-c2', 'e-view'), grpc.status.FAILED_PRECONDITION, /only active ones can be committed/],
      ['commit a missing key', () => h.client.commit('e-c3', 'nope'), grpc.status.NOT_FOUND, /"nope"/],
      ['commit onto an existing name', () => h.client.commit('e-c', 'e-active'), grpc.status.ALREADY_EXISTS, /"e-c" already exists/],
      ['stat a missing key', () => h.client.stat('nope'), grpc.status.NOT_FOUND, /"nope" does not exist/],
      ['remove a missing key', () => h.client.remove('nope'), grpc.status.NOT_FOUND, /does not exist/],
      ['usage of a missing key', () => h.client.usage('nope'), grpc.status.NOT_FOUND, /does not exist/],
      ['update an immutable field', () => h.client.update({ name: 'e-c', parent: 'x' }, ['parent']), grpc.status.INVALID_ARGUMENT, /only labels can change/],
      ['update a missing snapshot', () => h.client.update({ name: 'nope', labels: {} }), grpc.status.NOT_FOUND, /does not exist/],
      ['a label over 4 KiB', () => h.client.prepare('e-z', '', { big: 'x'.repeat(4096) }), grpc.status.INVALID_ARGUMENT, /at most 4096 bytes/]
    ]
    for (const [what, call, code, message] of cases) {
      const err = await statusOf(call())
      assert.equal(err.code, code, `${what}: ${err.details}`)
      assert.match(err.details, message, what)
    }
    // No failed call left a directory behind: one per record.
    assert.equal((await readdir(join(h.root, 'snapshots'))).length, (await h.client.list()).infos.length)
  })

  it('lets a removed key be used again, and a removed name be committed again', async () => {
    // containerd's testsuite checkRemove
    await h.client.prepare('r-a')
    await h.client.commit('r-1', 'r-a')
    await h.client.prepare('r-reuse', 'r-1')
    await h.client.remove('r-reuse')
    await h.client.view('r-reuse', 'r-1')
    await h.client.remove('r-reuse')
    await h.client.prepare('r-reuse')
    await h.client.remove('r-1')
    await h.client.commit('r-1', 'r-reuse')
    assert.equal((await h.client.stat('r-1')).kind, KIND.committed)
  })

  it('reports usage: active snapshots measured now, committed ones as committed', async () => {
    const mounts = await h.client.prepare('u-a')
    const before = await h.client.usage('u-a')
    assert.deepEqual(before, { size: (await stat(fsOf(await idOf(h, 'u-a')))).blocks * 512, inodes: 1 }, 'an empty snapshot is its root directory')
    await withMounted(mounts, async dir => {
      await writeFile(join(dir, 'data'), Buffer.alloc(100_000, 7))
      await link(join(dir, 'data'), join(dir, 'data-link'))
      await mkdir(join(dir, 'sub'))
    })
    const fs = fsOf(await idOf(h, 'u-a'))
    const expectedSize = (await stat(fs)).blocks * 512 + (await stat(join(fs, 'data'))).blocks * 512 + (await stat(join(fs, 'sub'))).blocks * 512
    const during = await h.client.usage('u-a')
    assert.deepEqual(during, { size: expectedSize, inodes: 3 }, 'the hard link counts once')
    assert.ok(during.size >= 100_000)

    await h.client.commit('u-c', 'u-a')
    assert.deepEqual(await h.client.usage('u-c'), during)
    await writeFile(join(fs, 'late'), Buffer.alloc(50_000, 1))
    assert.deepEqual(await h.client.usage('u-c'), during, 'a committed snapshot reports what was measured at commit')
    await h.client.view('u-v', 'u-c')
    assert.deepEqual(await h.client.usage('u-v'), { size: 0, inodes: 0 })
  })

  it('updates labels the way containerd\'s storage does', async () => {
    await h.client.prepare('l-a', '', { keep: 'me' })
    const created = await h.client.stat('l-a')
    assert.deepEqual(created.createdAt, created.updatedAt)
    assert.deepEqual(created.labels, { keep: 'me' })
    await new Promise(resolve => setTimeout(resolve, 5))

    // No mask: all mutable fields, i.e. the labels; parent and kind are ignored.
    let info = await h.client.update({ name: 'l-a', parent: 'doesnotexist', kind: KIND.committed, labels: { l1: 'v1', l2: 'v2', l3: 'v3', root: 'r' } })
    assert.deepEqual(info.labels, { l1: 'v1', l2: 'v2', l3: 'v3', root: 'r' })
    assert.equal(info.parent, '')
    assert.equal(info.kind, KIND.active)
    assert.deepEqual(info.createdAt, created.createdAt)
    assert.ok(timestampMs(info.updatedAt) > timestampMs(created.updatedAt))

    // labels.KEY sets one key; a key the request has no value for is removed.
    info = await h.client.update({ name: 'l-a', labels: { l1: 'updated', l4: 'v4' } }, ['labels.l1', 'labels.l2'])
    assert.deepEqual(info.labels, { l1: 'updated', l3: 'v3', root: 'r' })
    info = await h.client.update({ name: 'l-a', labels: { l4: 'v4', root: 'r' } }, ['labels'])
    assert.deepEqual(info.labels, { l4: 'v4', root: 'r' })
    assert.deepEqual((await h.client.stat('l-a')).labels, { l4: 'v4', root: 'r' })

    // Commit replaces the labels rather than inheriting them.
    await h.client.commit('l-c', 'l-a', { fresh: 'yes' })
    assert.deepEqual((await h.client.stat('l-c')).labels, { fresh: 'yes' })
  })

  it('lists with containerd filters (testsuite checkWalk) in batches', async () => {
    const gc = { 'containerd.io/gc.root': 'check-walk' }
    await h.client.prepare('w/a-np', '', gc)
    await h.client.prepare('w/p-tmp', '', gc)
    await h.client.commit('w/p', 'w/p-tmp', gc)
    await h.client.prepare('w/a', 'w/p', gc)
    await h.client.view('w/v', 'w/p', gc)
    await h.client.prepare('w/p-wl-tmp', '', gc)
    await h.client.commit('w/p-wl', 'w/p-wl-tmp', { l: '1', ...gc })
    await h.client.prepare('w/a-wl', 'w/p-wl', { l: '2', ...gc })
    await h.client.view('w/v-wl', 'w/p-wl', { l: '3', ...gc })
    await h.client.prepare('w/a-np-wl', '', { l: '2', ...gc })

    const names = async (filters: string[]): Promise<string[]> =>
      (await h.client.list(filters)).infos.map(i => i.name).filter(n => n.startsWith('w/')).map(n => n.slice(2)).sort()
    const cases: Array<[string[], string[]]> = [
      [['labels."containerd.io/gc.root"==check-walk'], ['a-np', 'p', 'a', 'v', 'p-wl', 'a-wl', 'v-wl', 'a-np-wl']],
      [['kind==active,labels."containerd.io/gc.root"==check-walk'], ['a-np', 'a', 'a-wl', 'a-np-wl']],
      [['kind==view,labels."containerd.io/gc.root"==check-walk'], ['v', 'v-wl']],
      [['kind==committed,labels."containerd.io/gc.root"==check-walk'], ['p', 'p-wl']],
      [['name==w/p', 'name==w/a-np-wl'], ['p', 'a-np-wl']],
      [['name==w/a-wl,labels.l'], ['a-wl']],
      [['parent==w/p'], ['a', 'v']],
      [['parent!="",labels."containerd.io/gc.root"==check-walk'], ['a', 'v', 'a-wl', 'v-wl']],
      [['labels.l'], ['p-wl', 'a-wl', 'v-wl', 'a-np-wl']],
      [['labels.l==2'], ['a-wl', 'a-np-wl']],
      [['name~=^w/p'], ['p', 'p-wl']]
    ]
    for (const [filters, expected] of cases) assert.deepEqual(await names(filters), expected.sort(), filters.join(' | '))

    const all = await names([])
    assert.equal(all.length, 8)
    assert.deepEqual(await names(['this is ((( not a filter']), all, 'a filter that is not understood lists everything')

    for (let i = 0; i < 120; i++) await h.client.view(`batch-${i}`)
    const listed = await h.client.list()
    assert.ok(listed.infos.filter(i => i.name.startsWith('batch-')).length === 120)
    assert.ok(listed.messages >= 2, 'List sends the infos in several messages')
    for (let i = 0; i < 120; i++) await h.client.remove(`batch-${i}`)
  })
})

describe('snapshotter persistence and cleanup', () => {
  it('keeps its snapshots across a close and reopen, and never reuses an id', async () => {
    const first = await startHarness()
    const root = first.root
    try {
      const mounts = await first.client.prepare('p-a', '', { x: '1' })
      await withMounted(mounts, async dir => { await writeFile(join(dir, 'kept'), 'kept') })
      await first.client.commit('p-c', 'p-a', { y: '2' })
      await first.client.prepare('p-active', 'p-c')
      await first.client.view('p-gone')
    } finally {
      await first.stop()
    }
    const before = await readdir(join(root, 'snapshots'))
    const second = await startHarness({ root })
    try {
      const infos = (await second.client.list()).infos.map(i => [i.name, i.kind, i.parent, i.labels])
      assert.deepEqual(infos.sort(), [['p-active', KIND.active, 'p-c', {}], ['p-c', KIND.committed, '', { y: '2' }], ['p-gone', KIND.view, '', {}]].sort())
      const view = await second.client.view('p-view', 'p-c')
      await withMounted(view, async dir => { assert.equal(await readFile(join(dir, 'kept'), 'utf8'), 'kept') })
      await second.client.remove('p-gone')
      await second.client.view('p-new')
      const ids = (await readdir(join(root, 'snapshots'))).map(Number)
      assert.ok(Math.min(...ids.filter(id => !before.includes(String(id)))) > Math.max(...before.map(Number)), 'new snapshots get new ids')
    } finally {
      await second.stop()
    }
  })

  it('Cleanup removes snapshot directories that no record names', async () => {
    const h = await startHarness()
    try {
      await h.client.prepare('c-a')
      await h.client.commit('c-c', 'c-a')
      await h.client.view('c-v', 'c-c')
      const snapshots = join(h.root, 'snapshots')
      const recorded = (await readdir(snapshots)).sort()
      // What a crash between making a directory and recording it leaves, and a stray temp dir.
      await mkdir(join(snapshots, '9999', 'fs', 'deep'), { recursive: true })
      await writeFile(join(snapshots, '9999', 'fs', 'deep', 'file'), 'orphan')
      await mkdir(join(snapshots, 'new-123'))
      await h.client.cleanup()
      assert.deepEqual((await readdir(snapshots)).sort(), recorded)
      assert.equal((await h.client.stat('c-v')).kind, KIND.view)
      // A removed snapshot's directory is gone at once.
      await h.client.remove('c-v')
      assert.equal((await readdir(snapshots)).length, recorded.length - 1)
    } finally {
      await h.stop()
    }
  })
})

/** The snapshot directory id of KEY, from its mounts or (for committed ones) a child view. */
async function idOf (h: Harness, key: string): Promise<number> {
  const info = await h.client.stat(key)
  const probe = info.kind === KIND.committed ? await h.client.view(`${key}-idprobe`, key) : await h.client.mounts(key)
  if (info.kind === KIND.committed) await h.client.remove(`${key}-idprobe`)
  const m = probe[0]!
  const option = (name: string): string | undefined => m.options.find(o => o.startsWith(`${name}=`))?.slice(name.length + 1)
  // An active snapshot's own layer is its upper dir; a view's top layer is the first lower dir.
  const path = m.type === 'bind' ? m.source : option('upperdir') ?? option('lowerdir')!.split(':')[0]!
  const id = /\/snapshots\/(\d+)\/fs$/.exec(path)?.[1]
  assert.ok(id !== undefined, `no snapshot id in ${path}`)
  return Number(id)
}

function timestampMs (t: { seconds: number, nanos: number } | null): number {
  assert.ok(t !== null)
  return t.seconds * 1000 + t.nanos / 1e6
}
