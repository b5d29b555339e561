import assert from 'node:assert/strict'
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'
import { after, before, describe, test } from 'node:test'
import { OriginError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { HttpOrigin } from '../../src/origin/http-origin.ts'
import { bytes, makeLayout, until, type TestLayout } from './helpers.ts'

/**
 * HttpOrigin against static servers other than ours, serving the same layout
 * directory. Nothing is installed: a server that is missing is skipped.
 */

function have (command: string, ...args: string[]): boolean {
  return spawnSync(command, args, { stdio: 'ignore' }).error === undefined
}

async function freePort (): Promise<number> {
  const probe = createServer()
  await new Promise<void>(resolve => probe.listen(0, '127.0.0.1', resolve))
  const port = (probe.address() as { port: number }).port
  await new Promise<void>(resolve => probe.close(() => resolve()))
  return port
}

async function stop (child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise(resolve => child.once('exit', resolve))
  child.kill('SIGTERM')
  await exited
}

describe('compatibility with other static servers', () => {
  let fx: TestLayout
  let large: { digest: Digest, data: Uint8Array }
  before(async () => {
    fx = await makeLayout()
    const data = bytes(9 * 1024 * 1024, 5) // above HttpOrigin's 8 MiB limit for servers without Range
    large = { digest: await fx.layout.writeBlob(data), data }
  })
  after(async () => { await fx.cleanup() })

  test('busybox httpd (supports Range)', { timeout: 30_000 }, async t => {
    if (!have('busybox', 'httpd', '--help')) {
      t.skip('busybox is not installed; skipping the busybox httpd compatibility check')
      return
    }
    const port = await freePort()
    const child = spawn('busybox', ['httpd', '-f', '-p', `127.0.0.1:${port}`, '-h', fx.dir], { stdio: 'ignore' })
    try {
      const origin = new HttpOrigin(`http://127.0.0.1:${port}`, { baseDelayMs: 50 }) // retries cover the start-up
      assert.equal((await origin.resolve('v1')).digest, fx.manifest.digest)
      assert.deepEqual(await origin.getRange(large.digest, 5 * 1024 * 1024, 100_000), large.data.subarray(5 * 1024 * 1024, 5 * 1024 * 1024 + 100_000))
      assert.deepEqual(await origin.getBlob(fx.small.digest), fx.small.data)
    } finally {
      await stop(child)
    }
  })

  test('python3 -m http.server (no Range support: small blobs only)', { timeout: 30_000 }, async t => {
    if (!have('python3', '--version')) {
      t.skip('python3 is not installed; skipping the http.server compatibility check')
      return
    }
    const child = spawn('python3', ['-u', '-m', 'http.server', '--bind', '127.0.0.1', '--directory', fx.dir, '0'], { stdio: ['ignore', 'pipe', 'ignore'] })
    try {
      let banner = ''
      child.stdout!.on('data', (c: Buffer) => { banner += c.toString() })
      await until(() => /port \d+/.test(banner) || child.exitCode !== null)
      const port = /port (\d+)/.exec(banner)?.[1]
      assert.ok(port !== undefined, `python3 http.server did not start: ${banner}`)
      const origin = new HttpOrigin(`http://127.0.0.1:${port}`)

      assert.equal((await origin.resolve('v1')).digest, fx.manifest.digest)
      assert.equal((await origin.resolve(fx.small.digest)).size, fx.small.data.length) // via HEAD
      assert.deepEqual(await origin.getBlob(fx.big.digest), fx.big.data)
      // It answers a Range request with 200 and the whole blob: HttpOrigin slices small ones...
      assert.deepEqual(await origin.getRange(fx.big.digest, 1000, 5000), fx.big.data.subarray(1000, 6000))
      // ...and refuses to download a large blob for every range.
      await assert.rejects(origin.getRange(large.digest, 0, 10), (err: unknown) =>
        err instanceof OriginError && !err.retryable && /does not support Range requests/.test(err.message))
    } finally {
      await stop(child)
    }
  })
})
