import assert from 'node:assert/strict'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { after, before, describe, test } from 'node:test'
import { FormatError, NotFoundError, OriginError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { HttpOrigin } from '../../src/origin/http-origin.ts'
import { createOriginHandler, parseRange, startOriginServer, type OriginHandler, type OriginServer } from '../../src/origin/server.ts'
import { bytes, makeLayout, testServer, until, type TestLayout } from './helpers.ts'

/** Fast retries for tests: the backoff logic is the same, only shorter. */
const quick = { baseDelayMs: 1, maxDelayMs: 5 }

function isOriginError (status: number | undefined, retryable: boolean, message: RegExp) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof OriginError, `expected an OriginError, got ${String(err)}`)
    assert.equal(err.status, status)
    assert.equal(err.retryable, retryable)
    assert.match(err.message, message)
    return true
  }
}

describe('HttpOrigin against the origin server', () => {
  let fx: TestLayout
  let server: OriginServer
  let origin: HttpOrigin

  before(async () => {
    fx = await makeLayout()
    server = await startOriginServer({ dir: fx.dir, host: '127.0.0.1', port: 0 })
    origin = new HttpOrigin(`${server.url}/`, quick)
  })
  after(async () => {
    await server.close()
    await fx.cleanup()
  })

  test('resolve a tag, a listed digest and an unlisted blob digest', async () => {
    assert.equal(origin.name, server.url)
    const byTag = await origin.resolve('v1')
    assert.equal(byTag.digest, fx.manifest.digest)
    assert.equal(byTag.size, fx.manifest.size)
    assert.equal(byTag.annotations?.['org.opencontainers.image.ref.name'], 'v1')

    const byDigest = await origin.resolve(fx.manifest.digest)
    assert.equal(byDigest.digest, fx.manifest.digest)
    assert.equal(byDigest.mediaType, fx.manifest.mediaType)

    // Not in index.json: synthesized from a HEAD of the blob.
    const synthesized = await origin.resolve(fx.small.digest)
    assert.deepEqual(synthesized, { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: fx.small.digest, size: 1000 })
  })

  test('tag lookups within indexTtlMs share one read of index.json; with 0, each reads it', async () => {
    for (const [ttl, reads] of [[60_000, 1], [0, 3]] as const) {
      const fresh = new HttpOrigin(`${server.url}/`, { ...quick, indexTtlMs: ttl })
      for (let i = 0; i < 3; i++) assert.equal((await fresh.resolve('v1')).digest, fx.manifest.digest)
      assert.equal(fresh.stats.requests, reads)
    }
  })

  test('resolve failures: unknown tag, unknown digest, malformed digest', async () => {
    await assert.rejects(origin.resolve('v2'), (err: unknown) => err instanceof NotFoundError && /no image tagged "v2".*tags: v1/.test(err.message))
    const unknown = `sha256:${'0'.repeat(64)}` as Digest
    await assert.rejects(origin.resolve(unknown), isOriginError(404, false, /blob sha256:0+ not found at http:\/\/127\.0\.0\.1:\d+\/blobs\/sha256\/0+$/))
    await assert.rejects(origin.resolve('sha256:xyz'), FormatError)
  })

  test('getBlob returns the whole blob and honours maxBytes', async () => {
    assert.deepEqual(await origin.getBlob(fx.small.digest), fx.small.data)
    assert.deepEqual(await origin.getBlob(fx.big.digest), fx.big.data)
    assert.deepEqual(await origin.getBlob(fx.empty.digest), new Uint8Array(0))
    await assert.rejects(origin.getBlob(fx.big.digest, { maxBytes: 1024 }), isOriginError(200, false, /more than the 1024 expected/))
  })

  test('getRange returns exactly the bytes asked for', async () => {
    const data = fx.big.data
    for (const [offset, length] of [[0, 1], [0, 65536], [12345, 100000], [data.length - 7, 7], [0, data.length]] as const) {
      assert.deepEqual(await origin.getRange(fx.big.digest, offset, length), data.subarray(offset, offset + length), `${offset}+${length}`)
    }
    assert.equal((await origin.getRange(fx.big.digest, 5, 0)).length, 0)
  })

  test('getRange past the end or of a missing blob fails without retrying', async () => {
    const before = origin.stats.requests
    const size = fx.big.data.length
    await assert.rejects(origin.getRange(fx.big.digest, size - 10, 20), isOriginError(206, false, new RegExp(`past the end of the blob \\(size ${size}\\)`)))
    await assert.rejects(origin.getRange(fx.big.digest, size, 1), isOriginError(416, false, new RegExp(`past the end of the blob \\(size ${size}\\)`)))
    const unknown = `sha256:${'1'.repeat(64)}` as Digest
    await assert.rejects(origin.getRange(unknown, 0, 1), isOriginError(404, false, /blob sha256:1+ not found at http:/))
    assert.equal(origin.stats.requests - before, 3)
    await assert.rejects(origin.getRange(fx.big.digest, -1, 1), RangeError)
    await assert.rejects(origin.getRange(fx.big.digest, 0, 1.5), RangeError)
  })

  test('the base URL may carry a path; a bad URL is a usage error', async () => {
    assert.throws(() => new HttpOrigin('ftp://x'), /must start with http/)
    assert.throws(() => new HttpOrigin('not a url'), /is not a URL/)
    const prefixed = new HttpOrigin(`${server.url}/some/prefix`, { ...quick, retries: 0 })
    await assert.rejects(prefixed.getBlob(fx.small.digest), isOriginError(404, false, /\/some\/prefix\/blobs\/sha256\//))
  })
})

/**
 * A server in front of the real origin handler that misbehaves on request
 * numbers chosen by the test (`plan` returns true when it answered itself).
 */
async function scriptedServer (handler: OriginHandler, plan: (n: number, req: IncomingMessage, res: ServerResponse) => boolean) {
  let count = 0
  const server = await testServer((req, res) => {
    count++
    if (!plan(count, req, res)) handler.handle(req, res)
  })
  return { ...server, get count () { return count } }
}

/** Headers for the right range, then half the body, then a reset connection. */
function cutMidBody (req: IncomingMessage, res: ServerResponse, data: Uint8Array): void {
  const range = parseRange(req.headers.range, data.length)
  const { start, end } = typeof range === 'object' ? range : { start: 0, end: data.length - 1 }
  res.writeHead(range === undefined ? 200 : 206, {
    'Content-Length': end - start + 1,
    ...(range === undefined ? {} : { 'Content-Range': `bytes ${start}-${end}/${data.length}` })
  })
  res.write(data.subarray(start, start + Math.floor((end - start + 1) / 2)), () => res.socket?.destroy())
}

describe('HttpOrigin retries and failures', () => {
  let fx: TestLayout
  let handler: OriginHandler
  before(async () => {
    fx = await makeLayout()
    handler = await createOriginHandler({ dir: fx.dir })
  })
  after(async () => { await fx.cleanup() })

  test('5xx, 429 and 408 are retried until the server recovers', async () => {
    const statuses = [503, 500, 429, 408]
    const server = await scriptedServer(handler, (n, _req, res) => {
      if (n > statuses.length) return false
      res.writeHead(statuses[n - 1]!).end('busy')
      return true
    })
    try {
      const origin = new HttpOrigin(server.url, quick)
      assert.deepEqual(await origin.getRange(fx.big.digest, 1000, 5000), fx.big.data.subarray(1000, 6000))
      assert.equal(server.count, 5)
      assert.equal(origin.stats.retries, 4)
    } finally {
      await server.close()
    }
  })

  test('gives up after retries + 1 attempts with a clear, retryable error', async () => {
    const server = await scriptedServer(handler, (_n, _req, res) => { res.writeHead(503).end(); return true })
    try {
      const origin = new HttpOrigin(server.url, { ...quick, retries: 3 })
      await assert.rejects(origin.getRange(fx.big.digest, 0, 10), isOriginError(503, true, /answered 503 Service Unavailable \(gave up after 4 attempts\)/))
      assert.equal(server.count, 4)
    } finally {
      await server.close()
    }
  })

  test('other 4xx are not retried', async () => {
    const server = await scriptedServer(handler, (_n, _req, res) => { res.writeHead(403).end(); return true })
    try {
      const origin = new HttpOrigin(server.url, quick)
      await assert.rejects(origin.getBlob(fx.small.digest), isOriginError(403, false, /answered 403 Forbidden$/))
      assert.equal(server.count, 1)
    } finally {
      await server.close()
    }
  })

  test('a connection cut mid-body is retried (getRange and getBlob)', async () => {
    const server = await scriptedServer(handler, (n, req, res) => {
      if (n % 2 === 0) return false
      cutMidBody(req, res, fx.big.data) // requests 1 and 3 fail
      return true
    })
    try {
      const origin = new HttpOrigin(server.url, quick)
      assert.deepEqual(await origin.getRange(fx.big.digest, 0, 1024 * 1024), fx.big.data.subarray(0, 1024 * 1024))
      assert.deepEqual(await origin.getBlob(fx.big.digest), fx.big.data)
      assert.equal(server.count, 4)
    } finally {
      await server.close()
    }
  })

  test('a cleanly ended but short body is a retryable truncation', async () => {
    const server = await scriptedServer(handler, (n, req, res) => {
      if (n > 1) return false
      // Chunked (no Content-Length), so only our length check can notice.
      const r = parseRange(req.headers.range, fx.big.data.length) as { start: number, end: number }
      res.writeHead(206, { 'Content-Range': `bytes ${r.start}-${r.end}/${fx.big.data.length}` })
      res.end(fx.big.data.subarray(r.start, r.start + 10))
      return true
    })
    try {
      const origin = new HttpOrigin(server.url, { ...quick, retries: 0 })
      await assert.rejects(origin.getRange(fx.big.digest, 0, 100), isOriginError(206, true, /sent 10 of 100 bytes \(truncated\)/))
      assert.deepEqual(await origin.getRange(fx.big.digest, 0, 100), fx.big.data.subarray(0, 100))
    } finally {
      await server.close()
    }
  })

  test('a body longer than asked for, or a wrong Content-Range, is refused', async () => {
    const server = await scriptedServer(handler, (n, _req, res) => {
      if (n === 1) {
        res.writeHead(206, { 'Content-Range': `bytes 0-99/${fx.big.data.length}` })
        res.end(fx.big.data.subarray(0, 200))
      } else {
        res.writeHead(206, { 'Content-Range': `bytes 1-100/${fx.big.data.length}` })
        res.end(fx.big.data.subarray(1, 101))
      }
      return true
    })
    try {
      const origin = new HttpOrigin(server.url, quick)
      await assert.rejects(origin.getRange(fx.big.digest, 0, 100), isOriginError(206, false, /more than the 100 bytes expected/))
      await assert.rejects(origin.getRange(fx.big.digest, 0, 100), isOriginError(206, false, /answered Content-Range "bytes 1-100\//))
      assert.equal(server.count, 2)
    } finally {
      await server.close()
    }
  })

  test('a server that ignores Range: small blobs are sliced, large ones refused', async () => {
    const large = bytes(9 * 1024 * 1024, 7)
    const largeDigest = await fx.layout.writeBlob(large)
    const server = await scriptedServer(handler, (_n, req) => {
      delete req.headers.range // the real handler now sends the whole blob with 200
      return false
    })
    try {
      const origin = new HttpOrigin(server.url, quick)
      assert.deepEqual(await origin.getRange(fx.small.digest, 10, 20), fx.small.data.subarray(10, 30))
      await assert.rejects(origin.getRange(fx.small.digest, 990, 20), isOriginError(200, false, /past the end of the blob \(size 1000\)/))
      await assert.rejects(origin.getRange(largeDigest, 0, 10), isOriginError(200, false, /does not support Range requests/))
      assert.equal(server.count, 3)
    } finally {
      await server.close()
    }
  })

  test('a per-attempt timeout is retried, then reported', async () => {
    const server = await scriptedServer(handler, () => true) // never answers
    try {
      const origin = new HttpOrigin(server.url, { ...quick, retries: 1, requestTimeoutMs: 100 })
      await assert.rejects(origin.getRange(fx.big.digest, 0, 10), isOriginError(undefined, true, /no answer, or no more bytes, for 100 ms \(gave up after 2 attempts\)/))
      assert.equal(server.count, 2)
    } finally {
      await server.close()
    }
  })

  test('a slow body that keeps arriving is not cut off: the timeout counts time without progress', async () => {
    const body = Buffer.alloc(8 * 1024, 7)
    const server = await testServer((_req, res) => {
      res.writeHead(206, { 'content-range': `bytes 0-${body.length - 1}/${body.length}`, 'content-length': String(body.length) })
      let sent = 0
      const tick = setInterval(() => {
        res.write(body.subarray(sent, sent + 1024))
        sent += 1024
        if (sent >= body.length) { clearInterval(tick); res.end() }
      }, 40) // 8 pieces over ~320 ms, each gap well under the 150 ms timeout
    })
    try {
      const origin = new HttpOrigin(server.url, { ...quick, retries: 0, requestTimeoutMs: 150 })
      const data = await origin.getRange(fx.big.digest, 0, body.length)
      assert.equal(data.length, body.length)
      assert.equal(origin.stats.requests, 1)
    } finally {
      await server.close()
    }
  })

  test('a refused connection is retried, then reported', async () => {
    const server = await testServer(() => {})
    await server.close()
    const origin = new HttpOrigin(server.url, { ...quick, retries: 2 })
    await assert.rejects(origin.getBlob(fx.small.digest), isOriginError(undefined, true, /fetch failed: ECONNREFUSED \(gave up after 3 attempts\)/))
    assert.equal(origin.stats.requests, 3)
  })
})

describe('HttpOrigin abort signals', () => {
  let fx: TestLayout
  before(async () => { fx = await makeLayout() })
  after(async () => { await fx.cleanup() })

  // No timing assertions: with a 60 s request timeout and a 60 s backoff, these
  // tests can only finish (inside the 10 s test timeout) if the abort works.
  const slow = { requestTimeoutMs: 60_000, baseDelayMs: 60_000, maxDelayMs: 60_000 }

  test('aborting during a request rejects with the caller\'s reason', { timeout: 10_000 }, async () => {
    let seen = 0
    const server = await testServer(() => { seen++ }) // never answers
    try {
      const origin = new HttpOrigin(server.url, slow)
      const controller = new AbortController()
      const pending = origin.getRange(fx.big.digest, 0, 10, { signal: controller.signal })
      await until(() => seen === 1)
      const reason = new Error('caller gave up')
      controller.abort(reason)
      await assert.rejects(pending, err => err === reason)
      await assert.rejects(origin.getBlob(fx.small.digest, { signal: AbortSignal.abort(reason) }), err => err === reason)
      assert.equal(seen, 1)
    } finally {
      await server.close()
    }
  })

  test('aborting during the backoff wait rejects at once', { timeout: 10_000 }, async () => {
    let seen = 0
    const server = await testServer((_req, res) => { seen++; res.writeHead(503).end() })
    try {
      const origin = new HttpOrigin(server.url, slow)
      const controller = new AbortController()
      const pending = origin.getBlob(fx.small.digest, { signal: controller.signal })
      await until(() => origin.stats.retries === 1) // the first attempt failed; now sleeping
      controller.abort(new Error('stop'))
      await assert.rejects(pending, /stop/)
      assert.equal(seen, 1)
    } finally {
      await server.close()
    }
  })

  test('aborting while queued for a concurrency slot rejects at once', { timeout: 10_000 }, async () => {
    let seen = 0
    const server = await testServer(() => { seen++ })
    try {
      const origin = new HttpOrigin(server.url, { ...slow, concurrency: 1 })
      const first = new AbortController()
      const second = new AbortController()
      const a = origin.getRange(fx.big.digest, 0, 10, { signal: first.signal })
      const b = origin.getRange(fx.big.digest, 10, 10, { signal: second.signal })
      await until(() => seen === 1)
      second.abort(new Error('second'))
      await assert.rejects(b, /second/)
      first.abort(new Error('first'))
      await assert.rejects(a, /first/)
      assert.equal(seen, 1)
    } finally {
      await server.close()
    }
  })
})

test('HttpOrigin keeps at most `concurrency` requests in flight', { timeout: 20_000 }, async () => {
  const fx = await makeLayout()
  const handler = await createOriginHandler({ dir: fx.dir })
  const limit = 3
  let inFlight = 0
  let max = 0
  let release!: () => void
  const gate = new Promise<void>(resolve => { release = resolve })
  // Hold every response until `limit` requests are in flight at once: if the
  // cap were lower this would never happen (the test times out), if it were
  // higher `max` would exceed it.
  const server = await testServer((req, res) => {
    inFlight++
    max = Math.max(max, inFlight)
    if (inFlight >= limit) release()
    res.on('close', () => { inFlight-- })
    void gate.then(() => handler.handle(req, res))
  })
  try {
    const origin = new HttpOrigin(server.url, { concurrency: limit })
    const reads = Array.from({ length: 40 }, (_, i) => origin.getRange(fx.big.digest, i * 4096, 4096))
    const results = await Promise.all(reads)
    results.forEach((data, i) => assert.deepEqual(data, fx.big.data.subarray(i * 4096, (i + 1) * 4096)))
    assert.equal(max, limit)
    assert.equal(origin.stats.requests, 40)
  } finally {
    await server.close()
    await fx.cleanup()
  }
})
