import assert from 'node:assert/strict'
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises'
import { Agent, get } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { sha256, digestHex } from '../../src/oci/digest.ts'
import { parseRange, startOriginServer, type OriginRequestLog, type OriginServer } from '../../src/origin/server.ts'
import { bytes, makeLayout, raw, until, type TestLayout } from './helpers.ts'

describe('origin server', () => {
  let fx: TestLayout
  let server: OriginServer
  const logs: OriginRequestLog[] = []
  let outside: string

  before(async () => {
    fx = await makeLayout()
    server = await startOriginServer({ dir: fx.dir, host: '127.0.0.1', port: 0, log: e => logs.push(e) })
    outside = await mkdtemp(join(tmpdir(), 'shoal-outside-'))
  })
  after(async () => {
    await server.close()
    await fx.cleanup()
    await rm(outside, { recursive: true, force: true })
  })

  const blobPath = (digest: string): string => `/blobs/sha256/${digest.slice(7)}`

  test('GET a blob: full body and immutable caching headers', async () => {
    const res = await raw(server.url, blobPath(fx.small.digest))
    assert.equal(res.status, 200)
    assert.deepEqual(new Uint8Array(res.body), fx.small.data)
    assert.equal(res.headers['content-length'], String(fx.small.data.length))
    assert.equal(res.headers['content-type'], 'application/octet-stream')
    assert.equal(res.headers['cache-control'], 'public, max-age=31536000, immutable')
    assert.equal(res.headers.etag, `"${fx.small.digest}"`)
    assert.equal(res.headers['accept-ranges'], 'bytes')
  })

  test('HEAD a blob: headers and no body', async () => {
    const res = await raw(server.url, blobPath(fx.big.digest), { method: 'HEAD' })
    assert.equal(res.status, 200)
    assert.equal(res.headers['content-length'], String(fx.big.data.length))
    assert.equal(res.body.length, 0)
  })

  test('an empty blob is served as an empty body', async () => {
    const res = await raw(server.url, blobPath(fx.empty.digest))
    assert.equal(res.status, 200)
    assert.equal(res.headers['content-length'], '0')
    assert.equal(res.body.length, 0)
  })

  test('index.json and oci-layout: no-cache with a content-hash ETag, and 304 on a match', async () => {
    for (const [path, type] of [['/index.json', 'application/vnd.oci.image.index.v1+json'], ['/oci-layout', 'application/json']] as const) {
      const res = await raw(server.url, path)
      assert.equal(res.status, 200, path)
      assert.equal(res.headers['cache-control'], 'no-cache')
      assert.equal(res.headers['content-type'], type)
      assert.equal(res.headers.etag, `"${sha256(res.body)}"`)
      const again = await raw(server.url, path, { headers: { 'If-None-Match': res.headers.etag! } })
      assert.equal(again.status, 304)
      assert.equal(again.body.length, 0)
    }
    const index = JSON.parse((await raw(server.url, '/index.json')).body.toString()) as { manifests: Array<{ digest: string }> }
    assert.equal(index.manifests[0]!.digest, fx.manifest.digest)
    // A query string (cache busting) does not change what is served.
    assert.equal((await raw(server.url, '/index.json?t=1')).status, 200)
  })

  test('the three single-range forms answer 206 with Content-Range', async () => {
    const data = fx.big.data
    const size = data.length
    const cases: Array<[string, number, number]> = [
      ['bytes=100-199', 100, 199],
      ['bytes=0-0', 0, 0],
      [`bytes=${size - 10}-`, size - 10, size - 1],
      ['bytes=-500', size - 500, size - 1],
      [`bytes=${size - 5}-${size + 1000}`, size - 5, size - 1], // end past the size is clamped
      [`bytes=-${size * 2}`, 0, size - 1] // suffix longer than the blob is the whole blob
    ]
    for (const [range, start, end] of cases) {
      const res = await raw(server.url, blobPath(fx.big.digest), { headers: { Range: range } })
      assert.equal(res.status, 206, range)
      assert.equal(res.headers['content-range'], `bytes ${start}-${end}/${size}`, range)
      assert.equal(res.headers['content-length'], String(end - start + 1), range)
      assert.deepEqual(new Uint8Array(res.body), data.subarray(start, end + 1), range)
    }
  })

  test('unsatisfiable ranges answer 416 with bytes */SIZE', async () => {
    const size = fx.big.data.length
    for (const range of [`bytes=${size}-`, `bytes=${size + 10}-${size + 20}`, 'bytes=-0']) {
      const res = await raw(server.url, blobPath(fx.big.digest), { headers: { Range: range } })
      assert.equal(res.status, 416, range)
      assert.equal(res.headers['content-range'], `bytes */${size}`, range)
    }
    const empty = await raw(server.url, blobPath(fx.empty.digest), { headers: { Range: 'bytes=0-' } })
    assert.equal(empty.status, 416)
    assert.equal(empty.headers['content-range'], 'bytes */0')
  })

  test('multi-range, malformed ranges, HEAD and a stale If-Range get the full body', async () => {
    const path = blobPath(fx.small.digest)
    for (const range of ['bytes=0-1,5-6', 'bytes=5-3', 'items=0-1', 'bytes=abc']) {
      const res = await raw(server.url, path, { headers: { Range: range } })
      assert.equal(res.status, 200, range)
      assert.equal(res.body.length, fx.small.data.length, range)
    }
    const head = await raw(server.url, path, { method: 'HEAD', headers: { Range: 'bytes=0-1' } })
    assert.equal(head.status, 200)
    const stale = await raw(server.url, path, { headers: { Range: 'bytes=0-1', 'If-Range': '"sha256:other"' } })
    assert.equal(stale.status, 200)
    const fresh = await raw(server.url, path, { headers: { Range: 'bytes=0-1', 'If-Range': `"${fx.small.digest}"` } })
    assert.equal(fresh.status, 206)
  })

  test('If-None-Match: exact, weak, in a list and * give 304; another tag gives 200', async () => {
    const path = blobPath(fx.small.digest)
    const etag = `"${fx.small.digest}"`
    for (const value of [etag, `W/${etag}`, `"x", ${etag}`, '*']) {
      const res = await raw(server.url, path, { headers: { 'If-None-Match': value } })
      assert.equal(res.status, 304, value)
      assert.equal(res.headers.etag, etag)
      assert.equal(res.body.length, 0)
    }
    assert.equal((await raw(server.url, path, { headers: { 'If-None-Match': '"sha256:nope"' } })).status, 200)
  })

  test('404 for unknown digests and every other path, traversal included', async () => {
    const unknown = '0'.repeat(64)
    const paths = [
      `/blobs/sha256/${unknown}`,
      `/blobs/sha256/${digestHex(fx.small.digest).toUpperCase()}`,
      `${blobPath(fx.small.digest)}/`,
      `/blobs/sha512/${digestHex(fx.small.digest)}`,
      '/blobs/sha256/../../etc/passwd',
      '/blobs/sha256/%2e%2e/%2e%2e/etc/passwd',
      '/%2e%2e/%2e%2e/etc/passwd',
      '/blobs/sha256/..%2f..%2fetc%2fpasswd',
      '/../index.json',
      '/./index.json',
      '/index.json/',
      '//index.json',
      '/',
      '/blobs',
      '/blobs/sha256/'
    ]
    for (const path of paths) {
      const res = await raw(server.url, path)
      assert.equal(res.status, 404, path)
    }
  })

  test('a blob symlinked to a file outside the directory is refused; one inside is served', async () => {
    const secret = bytes(100, 99)
    const secretPath = join(outside, 'secret')
    await writeFile(secretPath, secret)
    const secretDigest = sha256(secret)
    await symlink(secretPath, fx.layout.blobPath(secretDigest))
    const res = await raw(server.url, blobPath(secretDigest))
    assert.equal(res.status, 404)
    await until(() => logs.some(e => e.path === blobPath(secretDigest)))
    assert.match(logs.find(e => e.path === blobPath(secretDigest))!.error ?? '', /outside the served directory/)

    // A symlink that stays inside (deduplicated stores do this) is fine.
    const inside = bytes(200, 98)
    const insideReal = join(fx.dir, 'blobs', 'real-copy')
    await writeFile(insideReal, inside)
    await symlink(insideReal, fx.layout.blobPath(sha256(inside)))
    const ok = await raw(server.url, blobPath(sha256(inside)))
    assert.equal(ok.status, 200)
    assert.deepEqual(new Uint8Array(ok.body), inside)

    // A directory under a digest name is not a blob.
    const dirBlob = sha256(bytes(10, 97))
    await mkdir(fx.layout.blobPath(dirBlob))
    assert.equal((await raw(server.url, blobPath(dirBlob))).status, 404)
  })

  test('405 for methods other than GET and HEAD', async () => {
    for (const method of ['POST', 'PUT', 'DELETE', 'OPTIONS']) {
      const res = await raw(server.url, blobPath(fx.small.digest), { method })
      assert.equal(res.status, 405, method)
      assert.equal(res.headers.allow, 'GET, HEAD')
    }
  })

  test('keep-alive: a second request reuses the connection', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 })
    try {
      const reused: boolean[] = []
      for (let i = 0; i < 2; i++) {
        await new Promise<void>((resolve, reject) => {
          const req = get(`${server.url}/index.json`, { agent }, res => {
            reused.push(req.reusedSocket)
            res.resume()
            res.on('end', resolve)
          })
          req.on('error', reject)
        })
      }
      assert.deepEqual(reused, [false, true])
    } finally {
      agent.destroy()
    }
  })

  test('stats count requests and body bytes', async () => {
    const before = { ...server.stats }
    await raw(server.url, blobPath(fx.small.digest), { headers: { Range: 'bytes=0-99' } })
    await raw(server.url, blobPath(fx.small.digest))
    await raw(server.url, '/nope')
    assert.equal(server.stats.requests - before.requests, 3)
    await until(() => server.stats.bytesSent - before.bytesSent >= 100 + fx.small.data.length)
    assert.equal(server.stats.bytesSent - before.bytesSent, 100 + fx.small.data.length)
  })
})

describe('origin server lifecycle and rate limit', () => {
  let fx: TestLayout
  before(async () => { fx = await makeLayout() })
  after(async () => { await fx.cleanup() })

  test('close() and the abort signal stop the server', async () => {
    const server = await startOriginServer({ dir: fx.dir, host: '127.0.0.1', port: 0 })
    assert.equal((await raw(server.url, '/oci-layout')).status, 200)
    await server.close()
    await server.close() // idempotent
    await assert.rejects(raw(server.url, '/oci-layout'), /ECONNREFUSED/)

    const controller = new AbortController()
    const other = await startOriginServer({ dir: fx.dir, port: 0, signal: controller.signal })
    assert.equal((await raw(other.url, '/oci-layout')).status, 200)
    controller.abort()
    await other.close()
    await assert.rejects(raw(other.url, '/oci-layout'), /ECONNREFUSED/)
  })

  test('refuses to start on a missing directory', async () => {
    await assert.rejects(startOriginServer({ dir: join(fx.dir, 'missing'), port: 0 }), /ENOENT/)
  })

  test('rate cap: all responses together stay near the configured bytes/s', async () => {
    // 256 KiB/s with a 25.6 KiB burst: 2 × 128 KiB in parallel cannot arrive in
    // much under 0.9 s. Only a lower bound is asserted; slow machines pass too.
    const rate = 256 * 1024
    const server = await startOriginServer({ dir: fx.dir, port: 0, rate })
    try {
      const path = `/blobs/sha256/${digestHex(fx.big.digest)}`
      const started = performance.now()
      const [a, b] = await Promise.all([
        raw(server.url, path, { headers: { Range: 'bytes=0-131071' } }),
        raw(server.url, path, { headers: { Range: 'bytes=131072-262143' } })
      ])
      const seconds = (performance.now() - started) / 1000
      assert.deepEqual(new Uint8Array(Buffer.concat([a.body, b.body])), fx.big.data.subarray(0, 262144))
      const floor = (262144 - rate / 10) / rate
      assert.ok(seconds >= floor * 0.95, `262144 bytes at ${rate} B/s took only ${seconds.toFixed(3)} s (expected at least ${floor.toFixed(3)} s)`)
      assert.equal(server.stats.bytesSent, 262144)
    } finally {
      await server.close()
    }
  })

  test('a client that hangs up mid-body does not disturb the server', async () => {
    const logs: OriginRequestLog[] = []
    const server = await startOriginServer({ dir: fx.dir, port: 0, rate: 64 * 1024, log: e => logs.push(e) })
    try {
      await new Promise<void>((resolve, reject) => {
        const req = get(`${server.url}/blobs/sha256/${digestHex(fx.big.digest)}`, { agent: false }, res => {
          res.once('data', () => { req.destroy(); resolve() })
        })
        req.on('error', err => { if ((err as NodeJS.ErrnoException).code !== 'ECONNRESET') reject(err) })
      })
      await until(() => logs.length === 1)
      assert.ok(logs[0]!.bytes < fx.big.data.length, 'the aborted response stopped early')
      const res = await raw(server.url, `/blobs/sha256/${digestHex(fx.small.digest)}`)
      assert.equal(res.status, 200)
      assert.deepEqual(new Uint8Array(res.body), fx.small.data)
    } finally {
      await server.close()
    }
  })
})

test('parseRange', () => {
  assert.deepEqual(parseRange('bytes=0-9', 100), { start: 0, end: 9 })
  assert.deepEqual(parseRange('BYTES=90-', 100), { start: 90, end: 99 })
  assert.deepEqual(parseRange('bytes=-10', 100), { start: 90, end: 99 })
  assert.equal(parseRange('bytes=100-', 100), 'unsatisfiable')
  assert.equal(parseRange('bytes=-0', 100), 'unsatisfiable')
  assert.equal(parseRange('bytes=0-1,3-4', 100), undefined)
  assert.equal(parseRange('bytes=-', 100), undefined)
  assert.equal(parseRange('bytes=9-1', 100), undefined)
  assert.equal(parseRange(undefined, 100), undefined)
})
