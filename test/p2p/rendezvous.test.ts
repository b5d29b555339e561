import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { test } from 'node:test'
import { sha256 } from '../../src/format/digest.ts'
import { chunkKey, nodeKey, ownerOf, rankNodes, score, selectSources, topNodes, type NodeKey } from '../../src/p2p/rendezvous.ts'

/** Peer-id-like strings: a shared prefix, like real `12D3KooW…` ids. */
const nodes = (n: number, tag = 'n'): NodeKey[] => Array.from({ length: n }, (_, i) => nodeKey(`12D3KooW${tag}${i.toString().padStart(5, '0')}`))
const keys = (n: number): string[] => Array.from({ length: n }, (_, i) => sha256(Buffer.from(`chunk ${i}`)))

test('rendezvous: the owner is the same whatever order the swarm is listed in', () => {
  const swarm = nodes(50)
  const shuffled = [...swarm].reverse()
  for (const digest of keys(200)) {
    const key = chunkKey(digest)
    assert.equal(ownerOf(key, swarm)!.id, ownerOf(key, shuffled)!.id)
    assert.deepEqual(rankNodes(key, swarm).map(n => n.id), rankNodes(key, shuffled).map(n => n.id))
  }
})

test('rendezvous: ownership is balanced across nodes', () => {
  const swarm = nodes(100)
  const owned = new Map<string, number>()
  const digests = keys(50_000)
  for (const digest of digests) {
    const owner = ownerOf(chunkKey(digest), swarm)!.id
    owned.set(owner, (owned.get(owner) ?? 0) + 1)
  }
  const counts = swarm.map(n => owned.get(n.id) ?? 0)
  const mean = digests.length / swarm.length
  // Binomial(50000, 1/100): sd ≈ 22; ±35 % is ~16 sd, so only a biased hash fails this.
  assert.ok(Math.min(...counts) > mean * 0.65, `least loaded node owns ${Math.min(...counts)} (mean ${mean})`)
  assert.ok(Math.max(...counts) < mean * 1.35, `most loaded node owns ${Math.max(...counts)} (mean ${mean})`)
})

test('rendezvous: removing a node moves only its chunks, each to the next in hash order', () => {
  const swarm = nodes(20)
  const gone = swarm[7]!
  const remaining = swarm.filter(n => n !== gone)
  let moved = 0
  for (const digest of keys(5000)) {
    const key = chunkKey(digest)
    const ranked = rankNodes(key, swarm)
    const before = ranked[0]!
    const after = ownerOf(key, remaining)!
    if (before.id === gone.id) {
      moved++
      assert.equal(after.id, ranked[1]!.id, 'a dead owner is replaced by the runner-up')
    } else {
      assert.equal(after.id, before.id, 'chunks of surviving owners stay put')
    }
  }
  assert.ok(moved > 0)
})

test('rendezvous: a joining node takes about 1/(n+1) of the chunks, only from others to itself', () => {
  const swarm = nodes(9)
  const joined = [...swarm, nodeKey('12D3KooWnewcomer')]
  const digests = keys(9000)
  let taken = 0
  for (const digest of digests) {
    const key = chunkKey(digest)
    const before = ownerOf(key, swarm)!.id
    const after = ownerOf(key, joined)!.id
    if (after !== before) {
      assert.equal(after, '12D3KooWnewcomer')
      taken++
    }
  }
  assert.ok(taken > digests.length / 10 * 0.7 && taken < digests.length / 10 * 1.3, `newcomer took ${taken} of ${digests.length}`)
})

test('rendezvous: topNodes agrees with a full sort, skip excludes', () => {
  const swarm = nodes(40)
  for (const digest of keys(100)) {
    const key = chunkKey(digest)
    const sorted = [...swarm].sort((x, y) => score(y, key) - score(x, key))
    assert.deepEqual(topNodes(key, swarm, 5).map(n => n.id), sorted.slice(0, 5).map(n => n.id))
    const skipped = sorted[0]!.id
    assert.equal(topNodes(key, swarm, 1, n => n.id === skipped)[0]!.id, sorted[1]!.id)
  }
  assert.throws(() => chunkKey('sha256:12'), RangeError)
})

test('selectSources: owner order stops at self; exclusions promote the next owner', () => {
  const swarm = nodes(10)
  const digest = sha256(randomBytes(32))
  const key = chunkKey(digest)
  const ranked = rankNodes(key, swarm)
  const base = { key, swarm, holders: [], excluded: () => false, maxOwners: 3, maxHolders: 4 }

  const owner = selectSources({ ...base, self: ranked[0]! })
  assert.equal(owner.selfIsOwner, true)
  assert.deepEqual(owner.owners, [], 'the owner asks no other owner')

  const third = selectSources({ ...base, self: ranked[2]! })
  assert.equal(third.selfIsOwner, false)
  assert.deepEqual(third.owners.map(n => n.id), [ranked[0]!.id, ranked[1]!.id], 'owners above us, in hash order, and no further')

  const ownerDead = selectSources({ ...base, self: ranked[1]!, excluded: id => id === ranked[0]!.id })
  assert.equal(ownerDead.selfIsOwner, true, 'when the owner is excluded the runner-up takes over')

  const last = selectSources({ ...base, self: ranked[9]! })
  assert.equal(last.owners.length, 3, 'maxOwners bounds the owners asked')

  const outsider = nodeKey('12D3KooWnot-announced-yet')
  const joined = selectSources({ ...base, self: outsider })
  assert.equal(joined.selfIsOwner, rankNodes(key, [...swarm, outsider])[0]!.id === outsider.id, 'self counts even if missing from the swarm list')
})

test('selectSources: holders are spread differently per requester, never include self or excluded', () => {
  const holders = nodes(8, 'h')
  const requesters = nodes(200, 'r')
  const digest = sha256(Buffer.from('popular chunk'))
  const firstChoice = new Map<string, number>()
  for (const self of requesters) {
    const selection = selectSources({ key: chunkKey(digest), self, swarm: [], holders: [...holders, self], excluded: id => id === holders[0]!.id, maxOwners: 2, maxHolders: 3 })
    assert.equal(selection.holders.length, 3)
    assert.ok(selection.holders.every(h => h.id !== self.id && h.id !== holders[0]!.id))
    const first = selection.holders[0]!.id
    firstChoice.set(first, (firstChoice.get(first) ?? 0) + 1)
  }
  // 200 requesters over 7 eligible holders: each should be someone's first choice
  assert.equal(firstChoice.size, 7, `first choices: ${JSON.stringify([...firstChoice.values()])}`)
  assert.ok(Math.max(...firstChoice.values()) < 200 / 7 * 2, 'no holder is everyone\'s first choice')
})
