import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkfifo } from './fifo.ts'
import { closeSync, constants, openSync } from 'node:fs'
import { readdir, readFile, rm } from 'node:fs/promises'
import { request } from 'node:http'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { after, before, describe, test } from 'node:test'
import { digestHex } from '../../src/oci/digest.ts'
import { FairTurns, startOriginServer, type OriginServer } from '../../src/origin/server.ts'
import { makeLayout, type TestLayout } from './helpers.ts'

/**
 * Issue 15 item 6: 500 clients that request a blob and never read took the origin
 * server from 131 to 343 MB RSS, 1,025 descriptors and ~1.7 GB of kernel TCP memory,
 * held for over 100 s, and the next normal request took 4-5 s. Here 200 such clients
 * (a child process, killed in `finally`) on loopback addresses 127.0.0.2-9 (the
 * server listens on 127.0.0.1 only; several source addresses keep each under the
 * per-client cap), against a server with a short send timeout.
 * Item 8: a FIFO under a blob name hung every GET of it.
 */

const NON_READERS = 200
const SEND_TIMEOUT_MS = 1500

/** A child process that opens N connections (from the given source addresses, round robin), asks each for PATH, and never reads. */
async function nonReaders (url: string, path: string, n: number, from: string[]): Promise<ChildProcess> {
  const script = `
    const net = require('node:net')
    const [port, path, n, from] = [Number(process.argv[1]), process.argv[2], Number(process.argv[3]), process.argv[4].split(',')]
    const sockets = []
    let connected = 0
    for (let i = 0; i < n; i++) {
      const s = net.connect({ host: '127.0.0.1', port, localAddress: from[i % from.length] }, () => {
        s.write('GET ' + path + ' HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')
        s.pause()
        if (++connected === n) console.log('ready')
      })
      s.on('error', () => { if (++connected === n) console.log('ready') })
      sockets.push(s)
    }
    process.stdin.on('close', () => process.exit(0)).resume() // ends with its parent`
  const child = spawn(process.execPath, ['-e', script, new URL(url).port, path, String(n), from.join(',')], { stdio: ['pipe', 'pipe', 'inherit'] })
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('non-reading clients not connected within 20 s')), 20_000)
    createInterface({ input: child.stdout! }).once('line', () => { clearTimeout(timer); resolve() })
    child.once('exit', code => { clearTimeout(timer); reject(new Error(`non-reader process exited (${code})`)) })
  })
  return child
}

async function stop (child: ChildProcess | undefined): Promise<void> {
  if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
  const gone = new Promise(resolve => child.once('exit', resolve))
  child.kill('SIGKILL')
  await gone
}

/** One GET from a given source address; resolves with status and ms. */
async function timedGet (url: string, path: string, localAddress = '127.0.0.1', timeoutMs = 15_000): Promise<{ status: number, ms: number, bytes: number }> {
  const u = new URL(url)
  const started = performance.now()
  return await new Promise((resolve, reject) => {
    const req = request({ host: u.hostname, port: u.port, path, localAddress, agent: false, timeout: timeoutMs }, res => {
      let bytes = 0
      res.on('data', (c: Buffer) => { bytes += c.length })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, ms: performance.now() - started, bytes }))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)))
    req.on('error', reject)
    req.end()
  })
}

const openFds = async (): Promise<number> => (await readdir('/proc/self/fd')).length
const rssMb = (): number => Math.round(process.memoryUsage().rss / 1048576)
/** Kernel memory of all TCP sockets on the machine, MB (the "mem" pages of /proc/net/sockstat). */
const tcpMemMb = async (): Promise<number> => Math.round(Number(/TCP: .* mem (\d+)/.exec(await readFile('/proc/net/sockstat', 'utf8'))?.[1] ?? 0) * 4096 / 1048576)
const connections = async (server: OriginServer): Promise<number> => server.stats.connections ?? NaN
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

describe('origin server under clients that never read', () => {
  let fx: TestLayout
  before(async () => { fx = await makeLayout({ bigSize: 16 * 1024 * 1024 }) })
  after(async () => { await fx.cleanup() })
  const blob = (d: string): string => `/blobs/sha256/${digestHex(d as `sha256:${string}`)}`

  test(`${NON_READERS} non-reading clients: dropped after the send timeout, while others are answered quickly`, { timeout: 90_000 }, async () => {
    const server = await startOriginServer({ dir: fx.dir, sendTimeoutMs: SEND_TIMEOUT_MS })
    let child: ChildProcess | undefined
    try {
      const base = { fds: await openFds(), rss: rssMb(), tcp: await tcpMemMb() }
      child = await nonReaders(server.url, blob(fx.big.digest), NON_READERS, ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6', '127.0.0.7', '127.0.0.8', '127.0.0.9'])
      // While the server pushes their responses into the kernel's buffers (the old server
      // served each as fast as the kernel took it, so others waited seconds for their turn).
      await sleep(300)
      const normal = await timedGet(server.url, blob(fx.small.digest))
      // Every connection accepted and its response started (a socket and a file each), then stalled.
      for (const t0 = performance.now(); await openFds() < base.fds + 2 * NON_READERS && performance.now() - t0 < 10_000;) await sleep(50)
      const during = { fds: await openFds(), rss: rssMb(), tcp: await tcpMemMb(), connections: await connections(server) }
      // Wait for the send timeout to drop them (bounded).
      let dropped = false
      const waitStart = performance.now()
      while (performance.now() - waitStart < SEND_TIMEOUT_MS + 8_000) {
        // base + the non-reader process's two pipes
        if (await openFds() <= base.fds + 2 && server.stats.connections === 0) { dropped = true; break }
        await sleep(100)
      }
      const droppedAfter = performance.now() - waitStart + 500
      const later = { fds: await openFds(), rss: rssMb(), tcp: await tcpMemMb(), connections: await connections(server) }
      process.stderr.write(`baseline ${JSON.stringify(base)}; with ${NON_READERS} non-readers ${JSON.stringify(during)}; a normal request took ${normal.ms.toFixed(0)} ms (status ${normal.status}); ` +
        `${dropped ? `dropped ${droppedAfter.toFixed(0)} ms after they stalled` : `not dropped after ${(SEND_TIMEOUT_MS + 8_500)} ms`}: ${JSON.stringify(later)}; sendTimeouts ${server.stats.sendTimeouts}\n`)
      assert.equal(normal.status, 200)
      assert.ok(normal.ms < 1000, `a normal request took ${normal.ms} ms while ${NON_READERS} clients stalled`)
      assert.ok(dropped, `the server still holds ${later.fds - base.fds} more descriptors than before, ${SEND_TIMEOUT_MS + 8_000} ms after its ${SEND_TIMEOUT_MS} ms send timeout`)
      assert.equal(later.connections, 0)
      assert.equal(server.stats.sendTimeouts, NON_READERS)
      assert.ok(later.tcp <= base.tcp + 50, `kernel TCP memory ${later.tcp} MB after the drop (baseline ${base.tcp} MB)`)
    } finally {
      await stop(child)
      await server.close()
    }
  })

  test('one client cannot take more than its share of connections: the rest get 503, others are served', { timeout: 60_000 }, async () => {
    const server = await startOriginServer({ dir: fx.dir, maxConnectionsPerClient: 16, sendTimeoutMs: 30_000 })
    let child: ChildProcess | undefined
    try {
      child = await nonReaders(server.url, blob(fx.big.digest), 100, ['127.0.0.2'])
      await sleep(500)
      const held = await connections(server)
      const refused = server.stats.refusedPerClient
      const same = await timedGet(server.url, blob(fx.small.digest), '127.0.0.2')
      const other = await timedGet(server.url, blob(fx.small.digest), '127.0.0.1')
      process.stderr.write(`100 non-readers from one address: ${held} connections held, ${refused} refused; another request from it: ${same.status}; from another address: ${other.status} in ${other.ms.toFixed(0)} ms\n`)
      assert.ok(held <= 16 + 1, `${held} connections held for one client`)
      assert.equal(same.status, 503)
      assert.equal(other.status, 200)
      assert.ok(other.ms < 1000)
    } finally {
      await stop(child)
      await server.close()
    }
  })

  test('the connection cap holds whatever the number of clients', { timeout: 60_000 }, async () => {
    const server = await startOriginServer({ dir: fx.dir, maxConnections: 50, sendTimeoutMs: 30_000 })
    let child: ChildProcess | undefined
    try {
      const base = await openFds()
      child = await nonReaders(server.url, blob(fx.big.digest), 120, ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6', '127.0.0.7', '127.0.0.8', '127.0.0.9'])
      await sleep(500)
      const held = await connections(server)
      const fds = await openFds() - base
      process.stderr.write(`120 non-readers against a cap of 50: ${held} connections, ${fds} more descriptors\n`)
      assert.ok(held <= 50, `${held} connections open`)
      assert.ok(fds <= 2 * 50 + 5, `${fds} more descriptors (a connection and its file each)`)
    } finally {
      await stop(child)
      await server.close()
    }
  })

  test('a FIFO under a blob name is a 404 at once, and does not block other requests', { timeout: 30_000 }, async () => {
    const server = await startOriginServer({ dir: fx.dir })
    const hex = 'f'.repeat(64)
    const fifo = join(fx.dir, 'blobs', 'sha256', hex)
    await mkfifo(fifo)
    try {
      // More than libuv's 4 threads: blocking opens would take the whole pool.
      const results = await Promise.all(Array.from({ length: 6 }, async () => await timedGet(server.url, `/blobs/sha256/${hex}`, '127.0.0.1', 5_000).catch((err: Error) => ({ status: 0, ms: 5_000, bytes: 0, err: err.message }))))
      const normal = await timedGet(server.url, blob(fx.small.digest), '127.0.0.1', 5_000).catch((err: Error) => ({ status: 0, ms: 5_000, bytes: 0, err: err.message }))
      process.stderr.write(`GET of a FIFO: ${results.map(r => `${r.status} in ${r.ms.toFixed(0)} ms`).join(', ')}; then a normal GET: ${normal.status} in ${normal.ms.toFixed(0)} ms\n`)
      for (const r of results) assert.equal(r.status, 404)
      assert.equal(normal.status, 200)
    } finally {
      // Release opens that block on the FIFO (they would hold libuv's threads, and the
      // process, forever): opening its write end lets every waiting reader through.
      for (let i = 0; i < 20; i++) {
        try { closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK)) } catch { break } // ENXIO: no reader waits
        await sleep(50)
      }
      await server.close()
      await rm(fifo, { force: true })
    }
  })
})

test('FairTurns: at most `limit` at once, granted round-robin by client, FIFO within one; an aborted waiter leaves', async () => {
  const turns = new FairTurns(1)
  const order: string[] = []
  const first = await turns.turn('a')
  const waiters = [
    ['a', 'a1'], ['a', 'a2'], ['a', 'a3'], ['b', 'b1'], ['c', 'c1'], ['b', 'b2']
  ].map(([client, name]) => turns.turn(client!).then(release => { order.push(name!); release() }))
  const controller = new AbortController()
  const aborted = turns.turn('d', controller.signal)
  controller.abort(new Error('gone'))
  await assert.rejects(aborted, /gone/)
  first()
  await Promise.all(waiters)
  // a's three requests do not starve b and c, who asked later.
  assert.deepEqual(order, ['a1', 'b1', 'c1', 'a2', 'b2', 'a3'])
})
