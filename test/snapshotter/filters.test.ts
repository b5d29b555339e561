/** containerd's filter syntax as List understands it, on plain SnapshotInfo values. */
import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { parseFilters } from '../../src/snapshotter/filters.ts'
import { Kind, type SnapshotInfo } from '../../src/snapshotter/types.ts'

const at = new Date(0)
const snapshots: SnapshotInfo[] = [
  { name: 'sha256:aaa', parent: '', kind: Kind.Committed, labels: { 'containerd.io/snapshot.ref': 'sha256:aaa' }, created: at, updated: at },
  { name: 'sha256:bbb', parent: 'sha256:aaa', kind: Kind.Committed, labels: { 'containerd.io/snapshot.ref': 'sha256:bbb', 'a.b': 'dotted' }, created: at, updated: at },
  { name: 'k8s.io/12/key with "quotes"', parent: 'sha256:bbb', kind: Kind.Active, labels: {}, created: at, updated: at },
  { name: 'view', parent: '', kind: Kind.View, labels: { l: '' }, created: at, updated: at }
]

function names (filters: string[]): string[] | undefined {
  const matches = parseFilters(filters)
  return matches === undefined ? undefined : snapshots.filter(matches).map(s => s.name)
}

describe('snapshot filters', () => {
  it('match what containerd sends', () => {
    // containerd 1.6 metadata/snapshot.go, after a remote Prepare: fmt.Sprintf(`labels."containerd.io/snapshot.ref"==%s,parent==%q`, ...)
    assert.deepEqual(names(['labels."containerd.io/snapshot.ref"==sha256:bbb,parent=="sha256:aaa"']), ['sha256:bbb'])
    assert.deepEqual(names(['labels."containerd.io/snapshot.ref"==sha256:aaa,parent==""']), ['sha256:aaa'])
    assert.deepEqual(names(['labels."containerd.io/snapshot.ref"==sha256:aaa,parent=="sha256:zzz"']), [])
    assert.deepEqual(names(['name=="k8s.io/12/key with \\"quotes\\""']), ['k8s.io/12/key with "quotes"'])
    assert.deepEqual(names(['name=="\\x73ha256:\\u0061aa"']), ['sha256:aaa'], 'Go escapes')
  })

  it('support presence, inequality, regexps, kinds, dotted keys and OR across filters', () => {
    assert.deepEqual(names([]), snapshots.map(s => s.name))
    assert.deepEqual(names(['']), snapshots.map(s => s.name))
    assert.deepEqual(names(['labels."containerd.io/snapshot.ref"']), ['sha256:aaa', 'sha256:bbb'])
    assert.deepEqual(names(['labels.l']), ['view'], 'an empty label value is still present')
    assert.deepEqual(names(['labels.a.b==dotted']), ['sha256:bbb'], 'unquoted dotted keys join with dots')
    assert.deepEqual(names(['parent!=""']), ['sha256:bbb', 'k8s.io/12/key with "quotes"'])
    assert.deepEqual(names(['labels.missing!=x']), snapshots.map(s => s.name), 'an absent field is unequal to anything')
    assert.deepEqual(names(['kind==committed']), ['sha256:aaa', 'sha256:bbb'])
    assert.deepEqual(names(['kind==view', 'kind==active']), ['k8s.io/12/key with "quotes"', 'view'])
    assert.deepEqual(names(['name~=^sha256:b']), ['sha256:bbb'])
    assert.deepEqual(names(['name~=/^v.*w$/']), ['view'])
    assert.deepEqual(names([' kind == active , parent == sha256:bbb ']), ['k8s.io/12/key with "quotes"'], 'spaces around tokens')
  })

  it('report filters they cannot parse, so that everything is listed', () => {
    for (const bad of ['name==', 'name=a', 'name===a', 'labels."unterminated==x', 'name==/re/', 'name~=(', ',', 'name==a,', 'name==a b', 'name=="\\q"']) {
      assert.equal(parseFilters([bad]), undefined, bad)
    }
    assert.equal(parseFilters(['kind==view', 'name==']), undefined, 'one bad filter spoils the set')
  })
})
