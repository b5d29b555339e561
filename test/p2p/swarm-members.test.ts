import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import type { PeerId } from '@libp2p/interface'
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { Digest } from '../../src/format/digest.ts'
import { SwarmMembers } from '../../src/p2p/swarm-members.ts'

const KEY: Digest = `sha256:${'ab'.repeat(32)}`

async function peers (n: number): Promise<PeerId[]> {
  return await Promise.all(Array.from({ length: n }, async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519'))))
}

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
  // Ids only need toString(): 1,300 real key pairs would take seconds.
  const fake = (i: number): PeerId => ({ toString: () => `peer-${i}` }) as unknown as PeerId
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
