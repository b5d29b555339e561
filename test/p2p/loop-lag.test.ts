import assert from 'node:assert/strict'
import { setTimeout as sleep } from 'node:timers/promises'
import { test } from 'node:test'
import { EventLoopLag } from '../../src/p2p/loop-lag.ts'

function block (ms: number): void {
  const until = performance.now() + ms
  while (performance.now() < until) { /* a starved event loop */ }
}

test('EventLoopLag: an idle loop reads near 0; a 400 ms block shows in the recent delay and the summary, and ages out', async () => {
  const lag = new EventLoopLag({ windowMs: 200, resolutionMs: 10 })
  try {
    await sleep(150)
    assert.ok(lag.recentMs() < 200, `idle: ${lag.recentMs()} ms`)
    block(400)
    await sleep(30)
    assert.ok(lag.recentMs() >= 350, `after a 400 ms block: ${lag.recentMs()} ms`)
    assert.ok(lag.summary().maxMs >= 350, JSON.stringify(lag.summary()))
    // Two windows later the block is out of the recent delay, not out of the lifetime summary.
    await sleep(500)
    assert.ok(lag.recentMs() < 200, `later: ${lag.recentMs()} ms`)
    assert.ok(lag.summary().maxMs >= 350)
  } finally {
    lag.close()
  }
})
