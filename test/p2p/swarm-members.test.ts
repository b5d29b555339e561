import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import type { PeerId } from '@libp2p/interface'
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { Digest } from '../../src/oci/digest.ts'
import { chunkKey, inCore, nodeKey } from '../../src/p2p/rendezvous.ts'
import { SwarmMembers } from '../../src/p2p/swarm-members.ts'

const KEY: Digest = `sha256:${'ab'.repeat(32)}`

async function peers (n: number): Promise<PeerId[]> {
  return await Promise.all(Array.from({ length: n }, async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519'))))
}

// Ids only need toString(): thousands of real key pairs would take seconds.
const fake = (i: number): PeerId => ({ toString: () => `peer-${i}` }) as unknown as PeerId
const isCore = (p: PeerId): boolean => inCore(nodeKey(p.toString()), chunkKey(KEY))

test('SwarmMembers: of() is the same array until a member is new, then lists it', async () => {
  const [a, b] = await peers(2)
  const members = new SwarmMembers()
  assert.deepEqual(members.of(KEY), [])
  assert.equal(members.add(KEY, a!, ['/ip4/127.0.0.1/tcp/1']), true)
  const first = members.of(KEY)
  assert.deepEqual(first.map(String), [a!.toString()])
  assert.equal(members.add(KEY, a!, []), false, 'a re-heard member is not new')
  assert.equal(members.of(KEY), first, 're-hearing a member keeps the answer')
  assert.equal(members.add(KEY, b!, []), true)
  assert.notEqual(members.of(KEY), first)
  assert.deepEqual(new Set(members.of(KEY).map(String)), new Set([a!.toString(), b!.toString()]))
})

test('SwarmMembers: sample is the most recently heard first, without the asker, at most the limit', async () => {
  const ps = await peers(5)
  const members = new SwarmMembers()
  for (const p of ps) members.add(KEY, p, [`/ip4/127.0.0.1/tcp/${ps.indexOf(p)}`])
  members.add(KEY, ps[1]!, ['/ip4/127.0.0.1/tcp/99']) // heard again: newest, new address
  const sample = members.sample(KEY, 3, ps[4]!.toString())
  assert.deepEqual(sample.map(m => m.id), [ps[1], ps[3], ps[2]].map(String))
  assert.deepEqual(sample[0]!.addresses, ['/ip4/127.0.0.1/tcp/99'])
  assert.deepEqual(members.sample(`sha256:${'cd'.repeat(32)}`, 3, ''), [])
})

test('SwarmMembers: a big swarm keeps the 1,024 most recently heard (pruned in batches)', async () => {
  const members = new SwarmMembers()
  members.add(KEY, fake(0), [])
  for (let i = 1; i < 1300; i++) {
    members.add(KEY, fake(i), [])
    if (i % 100 === 0) members.add(KEY, fake(0), []) // keeps being heard: stays
  }
  const ids = new Set(members.of(KEY).map(String))
  assert.ok(ids.size >= 1024 && ids.size <= 1280, `kept ${ids.size}`)
  assert.ok(ids.has('peer-0'), 'a member heard recently survives pruning')
  assert.ok(ids.has('peer-1299'))
  assert.ok(!ids.has('peer-1'), 'the least recently heard went first')
})

test('SwarmMembers: changed() wakes at the next add, rejects when its signal aborts', async () => {
  const [a] = await peers(1)
  const members = new SwarmMembers()
  const woke = members.changed(KEY, AbortSignal.timeout(5000))
  members.add(KEY, a!, [])
  await woke
  const controller = new AbortController()
  const aborted = members.changed(KEY, controller.signal)
  controller.abort(new Error('gave up'))
  await assert.rejects(aborted, /gave up/)
})

test('SwarmMembers: a big view is rebuilt when a core member arrives or the rest grew by an eighth', () => {
  const members = new SwarmMembers()
  const all = Array.from({ length: 2000 }, (_, i) => fake(i))
  const others = all.filter(p => !isCore(p))
  const core = all.filter(isCore)
  assert.ok(core.length > 20 && core.length < 120, `about 1 in 32 are core: ${core.length}`)
  for (const p of others.slice(0, 800)) members.add(KEY, p, [])
  const view = members.of(KEY)
  assert.equal(view.length, 800)
  for (const p of others.slice(800, 850)) members.add(KEY, p, [])
  assert.equal(members.of(KEY), view, '50 more of 800: not yet')
  members.add(KEY, core[0]!, [])
  assert.equal(members.of(KEY).length, 851, 'a core member: at once')
  const after = members.of(KEY)
  for (const p of others.slice(850, 960)) members.add(KEY, p, [])
  assert.notEqual(members.of(KEY), after, 'an eighth more: rebuilt')
  assert.equal(members.of(KEY).length, 961)
})

test('SwarmMembers: exchange tells a core joiner of the whole core and the core of it; others hear of part of it', () => {
  const members = new SwarmMembers()
  const all = Array.from({ length: 3000 }, (_, i) => fake(i))
  for (const p of all.slice(0, 2900)) members.add(KEY, p, [])
  const core = all.slice(0, 2900).filter(isCore).map(String)
  assert.ok(core.length > 40, `core known: ${core.length}`)
  const [coreJoiner] = all.slice(2900).filter(isCore)
  const [joiner] = all.slice(2900).filter(p => !isCore(p))

  const plain = members.exchange(KEY, joiner!, ['/ip4/10.0.0.1/tcp/1'])
  const heard = new Set(plain.answer.map(m => m.id))
  assert.ok(!heard.has(joiner!.toString()))
  assert.equal(core.filter(id => heard.has(id)).length, 32, 'a share of the core')
  assert.equal(plain.passOn.length, 8, 'a few recent members hear of a plain joiner')
  assert.ok(members.of(KEY).some(p => p.toString() === joiner!.toString()), 'the joiner is recorded')

  const special = members.exchange(KEY, coreJoiner!, [])
  const told = new Set(special.answer.map(m => m.id))
  assert.deepEqual(core.filter(id => !told.has(id)), [], 'a core joiner hears of every core member')
  assert.deepEqual(core.filter(id => !special.passOn.includes(id)), [], 'and every core member hears of it')
})
