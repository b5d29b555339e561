import assert from 'node:assert/strict'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { NotFoundError, OriginError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { makeLayout, type TestLayout } from './helpers.ts'

let fx: TestLayout
let origin: DirOrigin
before(async () => {
  fx = await makeLayout()
  origin = await DirOrigin.open(fx.dir)
})
after(async () => { await fx.cleanup() })

test('DirOrigin: open fails clearly on a directory that is not a layout', async () => {
  await assert.rejects(DirOrigin.open(join(fx.dir, 'blobs')), /is not an OCI image layout/)
})

test('DirOrigin: resolve a tag, a listed digest, an unlisted blob; unknown ones fail', async () => {
  assert.equal(origin.name, fx.dir)
  assert.equal((await origin.resolve('v1')).digest, fx.manifest.digest)
  assert.equal((await origin.resolve(fx.manifest.digest)).mediaType, fx.manifest.mediaType)
  assert.deepEqual(await origin.resolve(fx.small.digest), { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: fx.small.digest, size: 1000 })
  await assert.rejects(origin.resolve('v2'), NotFoundError)
  await assert.rejects(origin.resolve(`sha256:${'0'.repeat(64)}`), (err: unknown) => err instanceof OriginError && err.status === 404 && /not found in/.test(err.message))
})

test('DirOrigin: getBlob and maxBytes', async () => {
  assert.deepEqual(await origin.getBlob(fx.big.digest), fx.big.data)
  assert.deepEqual(await origin.getBlob(fx.empty.digest), new Uint8Array(0))
  await assert.rejects(origin.getBlob(fx.big.digest, { maxBytes: 10 }), /more than the 10 expected/)
})

test('DirOrigin: getRange returns exact bytes and checks bounds', async () => {
  const data = fx.big.data
  assert.deepEqual(await origin.getRange(fx.big.digest, 4096, 70000), data.subarray(4096, 74096))
  assert.deepEqual(await origin.getRange(fx.big.digest, data.length - 1, 1), data.subarray(data.length - 1))
  assert.equal((await origin.getRange(fx.big.digest, data.length, 0)).length, 0)
  await assert.rejects(origin.getRange(fx.big.digest, data.length - 1, 2), (err: unknown) =>
    err instanceof OriginError && !err.retryable && /past the end of the blob \(size 3145728\)/.test(err.message))
  const unknown = `sha256:${'2'.repeat(64)}` as Digest
  await assert.rejects(origin.getRange(unknown, 0, 1), (err: unknown) =>
    err instanceof OriginError && err.status === 404 && err.message === `blob ${unknown} not found in ${fx.dir}`)
  await assert.rejects(origin.getRange(fx.big.digest, -1, 1), RangeError)
})

test('DirOrigin: an aborted signal rejects', async () => {
  const reason = new Error('gone')
  await assert.rejects(origin.getRange(fx.big.digest, 0, 10, { signal: AbortSignal.abort(reason) }), err => err === reason)
  await assert.rejects(origin.resolve('v1', { signal: AbortSignal.abort(reason) }), err => err === reason)
})
