import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { test } from 'node:test'
import { sha256 } from '../../src/oci/digest.ts'
import { chunkKey, inCore, nodeKey, rootOf, rankNodes, score, selectSources, topNodes, type NodeKey } from '../../src/p2p/rendezvous.ts'

/** Peer-id-like strings: a shared prefix, like real `12D3KooW…` ids. */
const nodes = (n: number, tag = 'n'): NodeKey[] => Array.from({ length: n }, (_, i) => nodeKey(`12D3KooW${tag}${i.toString().padStart(5, '0')}`))
/** mulberry32: a deterministic stream for reproducible samples. */
function seeded (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const keys = (n: number): string[] => Array.from({ length: n }, (_, i) => sha256(Buffer.from(`chunk ${i}`)))

test('rendezvous: the owner is the same whatever order the swarm is listed in', () => {
  const swarm = nodes(50)
  const shuffled = [...swarm].reverse()
  for (const digest of keys(200)) {
    const key = chunkKey(digest)
    assert.equal(rootOf(key, swarm)!.id, rootOf(key, shuffled)!.id)
    assert.deepEqual(rankNodes(key, swarm).map(n => n.id), rankNodes(key, shuffled).map(n => n.id))
  }
})

test('rendezvous: ownership is balanced across nodes', () => {
  const swarm = nodes(100)
  const owned = new Map<string, number>()
  const digests = keys(50_000)
  for (const digest of digests) {
    const owner = rootOf(chunkKey(digest), swarm)!.id
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
    const after = rootOf(key, remaining)!
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
    const before = rootOf(key, swarm)!.id
    const after = rootOf(key, joined)!.id
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

test('selectSources: parents outrank self; the top node is the root; bans promote the next, suspects are asked last', () => {
  const swarm = nodes(10)
  const digest = sha256(randomBytes(32))
  const key = chunkKey(digest)
  const ranked = rankNodes(key, swarm)
  const base = { key, swarm, holders: [], excluded: () => false, maxParents: 3, maxHolders: 4 }

  const root = selectSources({ ...base, self: ranked[0]! })
  assert.equal(root.isRoot, true)
  assert.deepEqual(root.parents, [], 'the root asks nobody')
  assert.deepEqual(root.runnersUp.map(n => n.id), [ranked[1]!.id, ranked[2]!.id], 'a root looks first at the two ranked right below it')

  const third = selectSources({ ...base, self: ranked[2]! })
  assert.equal(third.isRoot, false)
  assert.deepEqual(third.runnersUp, [])
  assert.deepEqual(third.parents.map(n => n.id).sort(), [ranked[0]!.id, ranked[1]!.id].sort(), 'only nodes that outrank us')

  const rootDead = selectSources({ ...base, self: ranked[1]!, excluded: id => id === ranked[0]!.id })
  assert.equal(rootDead.isRoot, true, 'when the root is banned the runner-up takes over')

  const rootSlow = selectSources({ ...base, self: ranked[1]!, suspect: id => id === ranked[0]!.id })
  assert.equal(rootSlow.isRoot, false, 'a suspect root is still the root')
  assert.deepEqual(rootSlow.parents.map(n => n.id), [ranked[0]!.id])
  const slowFirst = selectSources({ ...base, self: ranked[3]!, maxParents: 2, suspect: id => id === ranked[0]!.id })
  assert.deepEqual(slowFirst.parents.map(n => n.id).sort(), [ranked[1]!.id, ranked[2]!.id].sort(), 'suspects only when too few others outrank us')
  const slowLast = selectSources({ ...base, self: ranked[3]!, suspect: id => id === ranked[0]!.id })
  assert.equal(slowLast.parents.at(-1)!.id, ranked[0]!.id, 'and then last')

  const last = selectSources({ ...base, self: ranked[9]! })
  assert.equal(last.parents.length, 3, 'maxParents bounds the parents asked')

  const outsider = nodeKey('12D3KooWnot-announced-yet')
  const joined = selectSources({ ...base, self: outsider })
  assert.equal(joined.isRoot, rankNodes(key, [...swarm, outsider])[0]!.id === outsider.id, 'self is ranked even if missing from the swarm list')
})

test('selectSources: request chains climb strictly and end at the root, even with partial views', () => {
  const everyone = nodes(400)
  const random = seeded(7)
  for (let trial = 0; trial < 50; trial++) {
    const key = chunkKey(sha256(randomBytes(32)))
    const rootId = rankNodes(key, everyone)[0]!.id
    // Each node sees its own random sample of 20 (kad-dht's provider walk stops at k = 20).
    const views = new Map(everyone.map(n => [n.id, Array.from({ length: 20 }, () => everyone[Math.floor(random() * everyone.length)]!)]))
    let node = everyone[Math.floor(random() * everyone.length)]!
    const seen = new Set<string>()
    for (;;) {
      assert.ok(!seen.has(node.id), 'no node appears twice in a chain')
      seen.add(node.id)
      const selection = selectSources({ key, self: node, swarm: views.get(node.id)!, holders: [], excluded: () => false, maxParents: 1, maxHolders: 0 })
      if (selection.isRoot) break
      const parent = selection.parents[0]!
      assert.ok(score(parent, key) > score(node, key), 'a parent outranks its child')
      node = parent
    }
    assert.ok(seen.size <= 400)
    if (views.get(node.id)!.some(n => n.id === rootId)) assert.equal(node.id, rootId, 'a chain ends at the true root when it is in view')
  }
})

test('selectSources with a swarm key: chains never loop, and views that hold the core agree on one root', () => {
  const everyone = nodes(3000)
  const group = chunkKey(sha256(Buffer.from('layer')))
  const core = everyone.filter(n => inCore(n, group))
  assert.ok(core.length > 50 && core.length < 150, `about 1 in 32 are core: ${core.length}`)
  const random = seeded(11)
  const sample = (k: number): typeof everyone => Array.from({ length: k }, () => everyone[Math.floor(random() * everyone.length)]!)
  // Views of 300 random members, plus the whole core (what peer exchange aims at), or not.
  const withCore = new Map(everyone.map(n => [n.id, [...sample(300), ...core]]))
  const without = new Map(everyone.map(n => [n.id, sample(300)]))
  for (const views of [withCore, without]) {
    const roots = new Set<string>()
    const key = chunkKey(sha256(Buffer.from('a chunk of the layer')))
    for (let start = 0; start < 300; start++) {
      let node = everyone[Math.floor(random() * everyone.length)]!
      const seen = new Set<string>()
      for (;;) {
        assert.ok(!seen.has(node.id), 'no node appears twice in a chain')
        seen.add(node.id)
        const selection = selectSources({ key, self: node, swarm: views.get(node.id)!, holders: [], excluded: () => false, maxParents: 1, maxHolders: 0, group })
        if (selection.isRoot) break
        const parent = selection.parents[0]!
        if (inCore(node, group)) assert.ok(inCore(parent, group), 'a core node asks only core nodes')
        node = parent
      }
      roots.add(node.id)
    }
    if (views === withCore) assert.deepEqual([...roots], [rankNodes(key, core)[0]!.id], 'one root: the core\'s top')
    else assert.ok(roots.size > 1, 'without the core in view, chains end at several roots (why peer exchange spreads it)')
  }
})

test('selectSources: with a full view, the tree spreads uploads (no node parents everybody)', () => {
  const swarm = nodes(200)
  const children = new Map<string, number>()
  for (let c = 0; c < 20; c++) {
    const key = chunkKey(sha256(Buffer.from(`chunk ${c}`)))
    for (const self of swarm) {
      const selection = selectSources({ key, self, swarm, holders: [], excluded: () => false, maxParents: 1, maxHolders: 0 })
      const parent = selection.parents[0]
      if (parent !== undefined) children.set(parent.id, (children.get(parent.id) ?? 0) + 1)
    }
  }
  // 20 chunks x 199 non-roots = 3,980 edges; one parent per chunk would be 199 per chunk.
  const most = Math.max(...children.values())
  assert.ok(most < 60, `the busiest parent has ${most} children over 20 chunks`)
  assert.ok(children.size > 100, `${children.size} of 200 nodes parent someone`)
})

test('selectSources: holders are spread differently per requester, never include self or excluded', () => {
  const holders = nodes(8, 'h')
  const requesters = nodes(200, 'r')
  const digest = sha256(Buffer.from('popular chunk'))
  const firstChoice = new Map<string, number>()
  for (const self of requesters) {
    const selection = selectSources({ key: chunkKey(digest), self, swarm: [], holders: [...holders, self], excluded: id => id === holders[0]!.id, maxParents: 2, maxHolders: 3 })
    assert.equal(selection.holders.length, 3)
    assert.ok(selection.holders.every(h => h.id !== self.id && h.id !== holders[0]!.id))
    const first = selection.holders[0]!.id
    firstChoice.set(first, (firstChoice.get(first) ?? 0) + 1)
  }
  // 200 requesters over 7 eligible holders: each should be someone's first choice
  assert.equal(firstChoice.size, 7, `first choices: ${JSON.stringify([...firstChoice.values()])}`)
  assert.ok(Math.max(...firstChoice.values()) < 200 / 7 * 2, 'no holder is everyone\'s first choice')
})
