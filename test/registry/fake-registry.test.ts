import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { readdir, readFile } from 'node:fs/promises'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { convertImage } from '../../src/convert/convert.ts'
import { IntegrityError, NotFoundError, OriginError } from '../../src/errors.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type ImageManifest } from '../../src/oci/types.ts'
import { parseRange } from '../../src/origin/server.ts'
import { RegistryClient, type RegistryClientOptions } from '../../src/registry/client.ts'
import { testServer, until, type TestServer } from '../origin/helpers.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * The registry client against fake registries in node:http, for what a real
 * registry will not do on cue: token services, failures, lies, cut connections.
 */

const REPO = 'team/app'
const quick = { baseDelayMs: 1, maxDelayMs: 5 }

interface Content {
  manifestDigest: Digest
  manifest: Uint8Array
  layer: { digest: Digest, size: number }
  blobs: Map<string, Uint8Array>
}

/** A hook sees each request first and may answer it itself (returns true). */
type Hook = (req: IncomingMessage, res: ServerResponse, n: number) => boolean

/**
 * Serves CONTENT as /v2/team/app/{manifests,blobs}/..., with Range on blobs; the
 * tag `v1` names the manifest. Requests go to HOOK first.
 */
async function fakeRegistry (content: Content, hook: Hook = () => false): Promise<TestServer & { requests: IncomingMessage[] }> {
  const requests: IncomingMessage[] = []
  const server = await testServer((req, res) => {
    requests.push(req)
    if (hook(req, res, requests.length)) return
    const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/?]+)$/.exec(req.url ?? '')
    if (m === null || m[1] !== REPO) {
      res.writeHead(404, { 'Content-Type': 'application/json' }).end(JSON.stringify({ errors: [{ code: 'NAME_UNKNOWN', message: 'repository name not known to registry' }] }))
      return
    }
    if (m[2] === 'manifests') {
      if (m[3] !== 'v1' && m[3] !== content.manifestDigest) {
        res.writeHead(404, { 'Content-Type': 'application/json' }).end(JSON.stringify({ errors: [{ code: 'MANIFEST_UNKNOWN', message: 'manifest unknown' }] }))
        return
      }
      res.writeHead(200, { 'Content-Type': MediaType.ociManifest, 'Content-Length': content.manifest.length, 'Docker-Content-Digest': content.manifestDigest })
      res.end(req.method === 'HEAD' ? undefined : content.manifest)
      return
    }
    const blob = content.blobs.get(m[3]!)
    if (blob === undefined) { res.writeHead(404, { 'Content-Type': 'application/json' }).end('{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'); return }
    const range = parseRange(req.headers.range, blob.length)
    if (range === 'unsatisfiable') { res.writeHead(416, { 'Content-Range': `bytes */${blob.length}` }).end(); return }
    const { start, end } = range ?? { start: 0, end: blob.length - 1 }
    res.writeHead(range !== undefined ? 206 : 200, { 'Content-Length': end - start + 1, ...(range !== undefined ? { 'Content-Range': `bytes ${start}-${end}/${blob.length}` } : {}) })
    res.end(req.method === 'HEAD' ? undefined : blob.subarray(start, end + 1))
  })
  return { ...server, requests }
}

function client (server: TestServer, options: Partial<RegistryClientOptions> = {}): RegistryClient {
  return new RegistryClient({ registry: new URL(server.url).host, plainHttp: true, ...quick, ...options })
}

/** Answers with a distribution-style error body. */
function answer (res: ServerResponse, status: number, headers: Record<string, string> = {}, code = 'UNAUTHORIZED'): true {
  res.writeHead(status, { 'Content-Type': 'application/json', ...headers }).end(JSON.stringify({ errors: [{ code, message: `fake ${status}` }] }))
  return true
}

function isOriginError (status: number | undefined, message: RegExp) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof OriginError, `expected an OriginError, got ${String(err)}`)
    assert.equal(err.status, status)
    assert.match(err.message, message)
    return true
  }
}

describe('registry client against fake registries', () => {
  let content: Content
  let layoutDir: string

  before(async () => {
    layoutDir = await tempDir()
    await buildSyntheticImage(layoutDir, 'v1', [[
      { type: 'dir', path: 'data' },
      { type: 'file', path: 'data/big', content: { size: 3 << 20, seed: 'fake-registry' } },
      { type: 'file', path: 'hello', content: 'hello from a fake registry\n' }
    ]])
    const layout = await OciLayout.open(layoutDir)
    const desc = await layout.resolveTag('v1')
    const blobs = new Map<string, Uint8Array>()
    for (const hex of await readdir(join(layoutDir, 'blobs', 'sha256'))) blobs.set(`sha256:${hex}`, await readFile(join(layoutDir, 'blobs', 'sha256', hex)))
    const manifest = blobs.get(desc.digest)!
    const layer = (JSON.parse(Buffer.from(manifest).toString()) as ImageManifest).layers[0]!
    content = { manifestDigest: desc.digest, manifest, layer: { digest: layer.digest, size: layer.size }, blobs }
  })

  describe('bearer tokens', () => {
    let registry: Awaited<ReturnType<typeof fakeRegistry>>
    let tokens: TestServer
    const tokenRequests: URL[] = []
    const tokenAuth: Array<string | undefined> = []
    const valid = new Set<string>()
    let issued = 0
    let lifetime = 300

    before(async () => {
      tokens = await testServer((req, res) => {
        const url = new URL(req.url!, 'http://x')
        tokenRequests.push(url)
        tokenAuth.push(req.headers.authorization)
        if (req.headers.authorization !== `Basic ${Buffer.from('alice:secret').toString('base64')}`) { answer(res, 401); return }
        const token = `t${++issued}:${url.searchParams.getAll('scope').join(' ')}`
        valid.add(token)
        res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ token, expires_in: lifetime }))
      })
      registry = await fakeRegistry(content, (req, res) => {
        const token = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1]
        const push = req.method !== 'GET' && req.method !== 'HEAD'
        const scope = `repository:${REPO}:${push ? 'pull,push' : 'pull'}`
        if (token !== undefined && valid.has(token) && token.includes(scope)) return false
        return answer(res, 401, { 'WWW-Authenticate': `Bearer realm="${tokens.url}/token",service="fake-registry",scope="${scope}"` })
      })
    })
    after(async () => {
      await registry.close()
      await tokens.close()
    })

    test('a 401 challenge is answered with a token for the scope, then reused until it expires', async () => {
      const c = client(registry, { credentials: { username: 'alice', password: 'secret' } })
      const desc = await c.resolveManifest(REPO, 'v1')
      assert.equal(desc.digest, content.manifestDigest)
      assert.equal(tokenRequests.length, 1)
      assert.equal(tokenRequests[0]!.searchParams.get('service'), 'fake-registry')
      assert.deepEqual(tokenRequests[0]!.searchParams.getAll('scope'), [`repository:${REPO}:pull`])

      // Same scope: the cached token goes along at once, no more 401s.
      const before = registry.requests.length
      assert.deepEqual(Buffer.from(await c.getBlob(REPO, content.layer.digest)), content.blobs.get(content.layer.digest))
      assert.equal(registry.requests.length, before + 1)
      assert.equal(tokenRequests.length, 1)

      // The registry forgets the token (revoked, restarted): one 401, a new token, success.
      valid.clear()
      assert.equal((await c.getBlobRange(REPO, content.layer.digest, 10, 5)).length, 5)
      assert.equal(tokenRequests.length, 2)
      c.close()
    })

    test('an expired token is renewed before the request, not after a 401', async () => {
      lifetime = 1 // renewed 0.5 s early: expired at once for practical purposes
      try {
        const c = client(registry, { credentials: { username: 'alice', password: 'secret' } })
        await c.resolveManifest(REPO, 'v1')
        const tokensBefore = tokenRequests.length
        const unauthorizedBefore = registry.requests.filter(r => r.headers.authorization === undefined).length
        await new Promise(resolve => setTimeout(resolve, 600))
        await c.resolveManifest(REPO, 'v1')
        assert.equal(tokenRequests.length, tokensBefore + 1)
        assert.equal(registry.requests.filter(r => r.headers.authorization === undefined).length, unauthorizedBefore, 'no anonymous retry')
        c.close()
      } finally {
        lifetime = 300
      }
    })

    test('wrong credentials and missing credentials are reported as such, without retries', async () => {
      const wrong = client(registry, { credentials: { username: 'alice', password: 'guess' }, credentialSource: '--src-creds' })
      await assert.rejects(wrong.resolveManifest(REPO, 'v1'), isOriginError(401, /refused the credentials of user "alice" \(from --src-creds\)/))
      assert.equal(tokenAuth.at(-1), `Basic ${Buffer.from('alice:guess').toString('base64')}`)
      const none = client(registry)
      await assert.rejects(none.getBlob(REPO, content.layer.digest), isOriginError(401, /requires credentials: log in/))
      assert.equal(wrong.stats.retries + none.stats.retries, 0)
    })
  })

  test('Basic auth: credentials are sent after the challenge; wrong ones are refused', async () => {
    const good = `Basic ${Buffer.from('bob:pw').toString('base64')}`
    const registry = await fakeRegistry(content, (req, res) => req.headers.authorization === good ? false : answer(res, 401, { 'WWW-Authenticate': 'Basic realm="fake"' }))
    try {
      const c = client(registry, { credentials: { username: 'bob', password: 'pw' } })
      assert.equal((await c.resolveManifest(REPO, 'v1')).digest, content.manifestDigest)
      await c.resolveManifest(REPO, 'v1')
      assert.equal(registry.requests.length, 3, 'the challenge once, then Basic on every request')
      await assert.rejects(client(registry, { credentials: { username: 'bob', password: 'no' } }).resolveManifest(REPO, 'v1'), isOriginError(401, /refused the credentials of user "bob"/))
    } finally {
      await registry.close()
    }
  })

  test('unknown repository, tag and blob: NotFoundError for manifests, a 404 OriginError for blobs', async () => {
    const registry = await fakeRegistry(content)
    try {
      const c = client(registry)
      await assert.rejects(c.resolveManifest(REPO, 'v2'), (err: unknown) => err instanceof NotFoundError && /^no image tagged "v2" in docker:\/\/127\.0\.0\.1:\d+\/team\/app$/.test(err.message))
      await assert.rejects(c.getManifest(REPO, 'v2'), (err: unknown) => err instanceof NotFoundError && /no image tagged "v2" in .* \(MANIFEST_UNKNOWN: manifest unknown\)$/.test(err.message))
      await assert.rejects(c.getManifest('team/other', 'v1'), (err: unknown) => err instanceof NotFoundError && /NAME_UNKNOWN/.test(err.message))
      await assert.rejects(c.getBlob(REPO, sha256(Buffer.from('nothing'))), isOriginError(404, /not found at http:\/\/127\.0\.0\.1:\d+: BLOB_UNKNOWN: blob unknown to registry/))
      assert.equal(await c.blobSize(REPO, sha256(Buffer.from('nothing'))), undefined)
      assert.equal(c.stats.retries, 0)
    } finally {
      await registry.close()
    }
  })

  test('5xx is retried with backoff, then given up with the registry\'s own words', async () => {
    const registry = await fakeRegistry(content, (req, res, n) => n <= 2 || req.url!.includes('manifests') ? answer(res, 500, {}, 'UNKNOWN') : false)
    try {
      const c = client(registry, { retries: 3 })
      assert.deepEqual(Buffer.from(await c.getBlob(REPO, content.layer.digest)), content.blobs.get(content.layer.digest))
      assert.equal(c.stats.retries, 2)
      await assert.rejects(c.getManifest(REPO, 'v1'), isOriginError(500, /manifest v1 in .*answered 500 Internal Server Error: UNKNOWN: fake 500 \(gave up after 4 attempts\)/))
    } finally {
      await registry.close()
    }
  })

  test('a truncated body is retried; one that stays truncated fails, never returns short', async () => {
    const blob = content.blobs.get(content.layer.digest)!
    let cuts = 1
    const registry = await fakeRegistry(content, (req, res) => {
      if (!req.url!.includes('/blobs/') || cuts-- <= 0) return false
      res.writeHead(200, { 'Content-Length': blob.length })
      res.write(blob.subarray(0, 1000), () => res.destroy())
      return true
    })
    try {
      const c = client(registry, { retries: 1 })
      assert.deepEqual(Buffer.from(await c.getBlob(REPO, content.layer.digest)), blob)
      assert.equal(c.stats.retries, 1)
      cuts = 2
      await assert.rejects(c.getBlob(REPO, content.layer.digest), isOriginError(200, /connection closed mid-body.*\(gave up after 2 attempts\)/))
    } finally {
      await registry.close()
    }
  })

  test('bytes that do not match their digest are refused: blobs, manifests, announced digests, streams', async () => {
    const tamper = (data: Uint8Array): Uint8Array => { const copy = Uint8Array.from(data); copy[copy.length >> 1]! ^= 1; return copy }
    const bad: Content = { ...content, blobs: new Map([...content.blobs].map(([d, b]) => [d, tamper(b)])), manifest: tamper(content.manifest) }
    const registry = await fakeRegistry(bad)
    try {
      const c = client(registry)
      await assert.rejects(c.getBlob(REPO, content.layer.digest), (err: unknown) => err instanceof IntegrityError && /content hashes to sha256:/.test(err.message))
      await assert.rejects(c.getManifest(REPO, content.manifestDigest), IntegrityError)
      // By tag: the bytes do not match the Docker-Content-Digest the registry announced.
      await assert.rejects(c.getManifest(REPO, 'v1'), (err: unknown) => err instanceof IntegrityError && new RegExp(`not ${content.manifestDigest}`).test(err.message))
      const chunks: Uint8Array[] = []
      await assert.rejects((async () => { for await (const c2 of c.streamBlob(REPO, { mediaType: MediaType.ociLayerGzip, ...content.layer })) chunks.push(c2) })(), IntegrityError)
      assert.equal(Buffer.concat(chunks).length, content.layer.size, 'the stream fails after its last byte')
    } finally {
      await registry.close()
    }
  })

  test('convert from a registry whose layer is corrupt fails and tags nothing', async () => {
    const tampered = new Map(content.blobs)
    const layer = Uint8Array.from(content.blobs.get(content.layer.digest)!)
    layer[layer.length - 20]! ^= 0xff // inside the gzip trailer: the tar itself still parses
    tampered.set(content.layer.digest, layer)
    const registry = await fakeRegistry({ ...content, blobs: tampered })
    const dest = await tempDir()
    try {
      await assert.rejects(convertImage({
        source: `docker://${new URL(registry.url).host}/${REPO}:v1`,
        dest: `oci:${dest}:out`,
        signingKey: generateKeyPairSync('ed25519').privateKey,
        sourceRegistry: { plainHttp: true }
      }), (err: unknown) => err instanceof Error && err.cause instanceof IntegrityError && /layer 0 .*content hashes to .*corrupting data/.test(err.message))
      assert.deepEqual([...(await (await OciLayout.open(dest)).tags()).keys()], [])
    } finally {
      await registry.close()
    }
  })

  test('a stream cut midway resumes with a Range request from the byte reached', async () => {
    const blob = content.blobs.get(content.layer.digest)!
    const ranges: Array<string | undefined> = []
    let cut = false
    const registry = await fakeRegistry(content, (req, res) => {
      if (!req.url!.includes('/blobs/')) return false
      ranges.push(req.headers.range)
      if (cut) return false
      cut = true
      res.writeHead(200, { 'Content-Length': blob.length })
      res.write(blob.subarray(0, 1 << 20), () => res.destroy())
      return true
    })
    try {
      const c = client(registry)
      const chunks: Uint8Array[] = []
      for await (const chunk of c.streamBlob(REPO, { mediaType: MediaType.ociLayerGzip, ...content.layer })) chunks.push(chunk)
      assert.deepEqual(Buffer.concat(chunks), Buffer.from(blob))
      assert.equal(ranges.length, 2)
      assert.equal(ranges[0], undefined)
      assert.match(ranges[1]!, /^bytes=\d+-$/)
      assert.ok(Number(/=(\d+)-/.exec(ranges[1]!)![1]) > 0)
    } finally {
      await registry.close()
    }
  })

  test('a stalled stream is noticed by its idle timeout; a slow consumer is not a stall', async () => {
    const blob = content.blobs.get(content.layer.digest)!
    let stall = true
    const registry = await fakeRegistry(content, (req, res) => {
      if (!req.url!.includes('/blobs/') || !stall) return false
      stall = false
      res.writeHead(200, { 'Content-Length': blob.length })
      res.write(blob.subarray(0, 4096)) // and then nothing
      return true
    })
    try {
      const c = client(registry, { requestTimeoutMs: 300 })
      const chunks: Uint8Array[] = []
      for await (const chunk of c.streamBlob(REPO, { mediaType: MediaType.ociLayerGzip, ...content.layer })) {
        chunks.push(chunk)
        await new Promise(resolve => setTimeout(resolve, 5)) // slow consumer: 100+ chunks x 5 ms > 300 ms in total
      }
      assert.deepEqual(Buffer.concat(chunks), Buffer.from(blob))
      assert.equal(c.stats.retries, 1)
    } finally {
      await registry.close()
    }
  })

  test('redirects to blob storage are followed without the Authorization header', async () => {
    const seenByStorage: Array<string | undefined> = []
    const storage = await fakeRegistry(content, (req) => { seenByStorage.push(req.headers.authorization); req.url = req.url!.replace('/storage', ''); return false })
    const good = `Basic ${Buffer.from('carol:pw').toString('base64')}`
    const registry = await fakeRegistry(content, (req, res) => {
      if (req.headers.authorization !== good) return answer(res, 401, { 'WWW-Authenticate': 'Basic realm="fake"' })
      if (!req.url!.includes('/blobs/')) return false
      res.writeHead(307, { Location: `${storage.url}/storage${req.url}` }).end()
      return true
    })
    try {
      const c = client(registry, { credentials: { username: 'carol', password: 'pw' } })
      const blob = content.blobs.get(content.layer.digest)!
      assert.deepEqual(Buffer.from(await c.getBlobRange(REPO, content.layer.digest, 100, 50)), blob.subarray(100, 150))
      assert.deepEqual(Buffer.from(await c.getBlob(REPO, content.layer.digest)), blob)
      assert.equal(await c.blobSize(REPO, content.layer.digest), blob.length)
      assert.equal(seenByStorage.length, 3)
      assert.deepEqual(seenByStorage, [undefined, undefined, undefined])
      assert.equal(storage.requests[0]!.headers.range, 'bytes=100-149', 'Range goes along to the storage')
    } finally {
      await registry.close()
      await storage.close()
    }
  })

  test('abort signals end a request, a backoff and a stream at once', { timeout: 10_000 }, async () => {
    let seen = 0
    const registry = await fakeRegistry(content, (req, res) => {
      seen++
      if (req.url!.includes('manifests')) return answer(res, 503, {}, 'UNAVAILABLE')
      if (req.url!.includes('/blobs/')) { res.writeHead(200, { 'Content-Length': 1 << 30 }); res.write(Buffer.alloc(1024)); return true }
      return true // never answers
    })
    try {
      const c = client(registry, { baseDelayMs: 60_000, maxDelayMs: 60_000, requestTimeoutMs: 60_000 })
      const reason = new Error('caller gave up')
      const backoff = new AbortController()
      const pending = c.resolveManifest(REPO, 'v1', { signal: backoff.signal })
      await until(() => c.stats.retries === 1)
      backoff.abort(reason)
      await assert.rejects(pending, err => err === reason)

      const streaming = new AbortController()
      const stream = c.streamBlob(REPO, { mediaType: MediaType.ociLayerGzip, digest: content.layer.digest, size: 1 << 30 }, { signal: streaming.signal })
      await stream.next()
      setTimeout(() => streaming.abort(reason), 20)
      await assert.rejects((async () => { for await (const _ of stream) { /* drain */ } })(), err => err === reason)
      assert.ok(seen >= 2)
    } finally {
      await registry.close()
    }
  })
})
