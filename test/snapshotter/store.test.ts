/** MetaStore on its own: ids, transactions and schema versions. */
import assert from 'node:assert/strict'
import Database from 'better-sqlite3'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { SnapshotExistsError, SnapshotNotFoundError, SnapshotStateError } from '../../src/snapshotter/errors.ts'
import { MetaStore } from '../../src/snapshotter/store.ts'
import { Kind } from '../../src/snapshotter/types.ts'
import { tempDir } from '../helpers/tmp.ts'

describe('MetaStore', () => {
  it('never hands out an id twice, even across reopen and for ids that were never recorded', async () => {
    const path = join(await tempDir('shoal-store-'), 'metadata.db')
    let store = MetaStore.open(path)
    const first = store.reserveId()
    const second = store.reserveId() // reserved, then "crashed" before its record
    store.insert({ id: first, name: 'a', kind: Kind.Active, parent: '', labels: {} })
    store.close()
    store = MetaStore.open(path)
    try {
      const third = store.reserveId()
      assert.ok(third > second && second > first)
      assert.deepEqual([...store.ids()], [first])
    } finally {
      store.close()
    }
  })

  it('checks inside each transaction and leaves no partial change when one fails', async () => {
    const store = MetaStore.open(join(await tempDir('shoal-store-'), 'metadata.db'))
    try {
      store.insert({ id: store.reserveId(), name: 'base-active', kind: Kind.Active, parent: '', labels: {} })
      const base = store.commit({ key: 'base-active', name: 'base', labels: { a: '1' }, usage: { size: 10, inodes: 2 }, id: store.require('base-active').id })
      const child = store.insert({ id: store.reserveId(), name: 'child', kind: Kind.Active, parent: 'base', labels: { x: 'y', empty: '' } })
      assert.deepEqual(child.labels, { x: 'y' }, 'empty label values are not stored')
      assert.deepEqual(store.chain(child.id), [child.id, base.id])

      assert.throws(() => store.insert({ id: store.reserveId(), name: 'child', kind: Kind.View, parent: '', labels: {} }), SnapshotExistsError)
      assert.throws(() => store.insert({ id: store.reserveId(), name: 'orphan', kind: Kind.View, parent: 'nope', labels: {} }), SnapshotNotFoundError)
      assert.throws(() => store.remove('base'), SnapshotStateError)
      assert.throws(() => store.commit({ key: 'child', name: 'base', labels: {}, usage: { size: 0, inodes: 0 }, id: child.id }), SnapshotExistsError)
      assert.throws(() => store.commit({ key: 'child', name: 'c2', labels: {}, usage: { size: 0, inodes: 0 }, id: child.id + 100 }), /removed and prepared again/)
      assert.equal(store.require('child').kind, Kind.Active, 'failed commits changed nothing')
      assert.deepEqual(store.all().map(r => r.name), ['base', 'child'])

      assert.equal(store.remove('child').name, 'child')
      assert.equal(store.remove('base').usage.size, 10)
      assert.deepEqual(store.all(), [])
    } finally {
      store.close()
    }
  })

  it('refuses a database written by an incompatible version', async () => {
    const path = join(await tempDir('shoal-store-'), 'metadata.db')
    const db = new Database(path)
    db.pragma('user_version = 99')
    db.close()
    assert.throws(() => MetaStore.open(path), /schema version 99, this shoal understands 1/)
  })
})
