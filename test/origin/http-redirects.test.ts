import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { OriginError } from '../../src/errors.ts'
import { HttpOrigin } from '../../src/origin/http-origin.ts'
import { createOriginHandler, type OriginHandler } from '../../src/origin/server.ts'
import { makeLayout, testServer, type TestLayout, type TestServer } from './helpers.ts'

/**
 * Issue 15 item 8: HttpOrigin (the client of `shoal origin serve`) followed redirects
 * to any host and port. It must follow only those to its own origin (scheme, host,
 * port), or to hosts its configuration names (`redirectHosts`). The registry client
 * (src/registry/) keeps following registry redirects to blob storage; not tested here.
 */
describe('HttpOrigin redirects', () => {
  let fx: TestLayout
  let handler: OriginHandler
  /** Serves the layout; counts what it is asked for. */
  let other: TestServer
  let otherHits = 0
  /** Redirects every /blobs/ and /index.json request to TARGET + path; /same/... to its own /... */
  let front: TestServer
  let target = ''

  before(async () => {
    fx = await makeLayout()
    handler = await createOriginHandler({ dir: fx.dir })
    other = await testServer((req, res) => { otherHits++; handler.handle(req, res) })
    front = await testServer((req, res) => {
      const url = req.url ?? '/'
      if (url.startsWith('/same/')) { handler.handle(Object.assign(req, { url: url.slice('/same'.length) }), res); return }
      if (url.startsWith('/loop/')) { res.writeHead(302, { Location: url }).end(); return }
      res.writeHead(302, { Location: `${target}${url}` }).end()
    })
  })
  after(async () => {
    await front.close()
    await other.close()
    await fx.cleanup()
  })

  test('a redirect to another port of the same host is refused, with what to do', async () => {
    target = other.url // 127.0.0.1, another port: another service
    const origin = new HttpOrigin(front.url, { retries: 0 })
    const before = otherHits
    await assert.rejects(origin.getBlob(fx.small.digest), (err: unknown) => {
      assert.ok(err instanceof OriginError, String(err))
      assert.match(err.message, /redirected to http:\/\/127\.0\.0\.1:\d+\/blobs\/sha256\/[0-9a-f]{64}, which this origin does not trust/)
      assert.match(err.message, /redirectHosts/)
      assert.equal(err.retryable, false)
      return true
    })
    await assert.rejects(origin.resolve('v1'), /does not trust/)
    await assert.rejects(origin.getRange(fx.big.digest, 0, 10), /does not trust/)
    assert.equal(otherHits, before, 'the untrusted host was never asked')
  })

  test('a redirect to a host the configuration names is followed', async () => {
    target = other.url
    const origin = new HttpOrigin(front.url, { redirectHosts: [new URL(other.url).host] })
    assert.deepEqual(await origin.getBlob(fx.small.digest), fx.small.data)
    assert.deepEqual(await origin.getRange(fx.big.digest, 100, 50), fx.big.data.subarray(100, 150))
    assert.equal((await origin.resolve('v1')).digest, fx.manifest.digest)
  })

  test('a redirect within the origin itself is followed', async () => {
    target = `${front.url}/same`
    const origin = new HttpOrigin(front.url)
    assert.deepEqual(await origin.getBlob(fx.small.digest), fx.small.data)
    assert.deepEqual(await origin.getRange(fx.big.digest, 7, 3), fx.big.data.subarray(7, 10))
  })

  test('a redirect loop ends with a clear error', async () => {
    const origin = new HttpOrigin(`${front.url}/loop`, { retries: 0 })
    await assert.rejects(origin.getBlob(fx.small.digest), /more than \d+ redirects/)
  })

  test('redirectHosts entries must be host or host:port', () => {
    assert.throws(() => new HttpOrigin(front.url, { redirectHosts: ['http://x/y'] }), /redirectHosts/)
  })

})
