import assert from 'node:assert/strict'
import { test } from 'node:test'
import { Semaphore, sleep } from '../../src/util/limit.ts'

test('Semaphore: at most max holders, granted in FIFO order', async () => {
  const sem = new Semaphore(2)
  const r1 = await sem.acquire()
  const r2 = await sem.acquire()
  const order: number[] = []
  const p3 = sem.acquire().then(r => { order.push(3); return r })
  const p4 = sem.acquire().then(r => { order.push(4); return r })
  await Promise.resolve()
  assert.equal(sem.active, 2)
  assert.equal(sem.waiting, 2)
  assert.deepEqual(order, [])
  r1()
  r1() // a second release of the same slot is ignored
  const r3 = await p3
  assert.deepEqual(order, [3])
  assert.equal(sem.active, 2)
  r2()
  const r4 = await p4
  assert.deepEqual(order, [3, 4])
  r3()
  r4()
  assert.equal(sem.active, 0)
  assert.throws(() => new Semaphore(0), RangeError)
})

test('Semaphore: an aborted waiter leaves the queue and is rejected with the reason', async () => {
  const sem = new Semaphore(1)
  const release = await sem.acquire()
  const controller = new AbortController()
  const waiting = sem.acquire(controller.signal)
  const reason = new Error('no longer needed')
  controller.abort(reason)
  await assert.rejects(waiting, err => err === reason)
  assert.equal(sem.waiting, 0)
  release()
  assert.equal(sem.active, 0)
  await assert.rejects(sem.acquire(AbortSignal.abort(reason)), err => err === reason)
  assert.equal(await sem.run(async () => 42), 42)
  assert.equal(sem.active, 0)
})

test('sleep: resolves, or rejects with the abort reason', async () => {
  await sleep(1)
  const controller = new AbortController()
  const pending = sleep(60_000, controller.signal)
  controller.abort(new Error('wake up'))
  await assert.rejects(pending, /wake up/)
  await assert.rejects(sleep(1, AbortSignal.abort(new Error('already'))), /already/)
})
