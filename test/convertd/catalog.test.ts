/** The registry client's catalog and tag lists (what sync walks), page by page, against a small fake registry. */
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'node:test'
import { openRegistryClient } from '../../src/registry/client.ts'

test('listRepositories and listTags follow Link pages; a repository without tags lists none', async () => {
  const pages: Record<string, { body: unknown, next?: string }> = {
    '/v2/_catalog?n=1000': { body: { repositories: ['a', 'b'] }, next: '/v2/_catalog?last=b&n=1000' },
    '/v2/_catalog?last=b&n=1000': { body: { repositories: ['team/c'] } },
    '/v2/a/tags/list?n=1000': { body: { name: 'a', tags: ['1', '2'] }, next: '/v2/a/tags/list?last=2&n=1000' },
    '/v2/a/tags/list?last=2&n=1000': { body: { name: 'a', tags: ['3'] } },
    '/v2/team/c/tags/list?n=1000': { body: { name: 'team/c', tags: null } }
  }
  const server = createServer((req, res) => {
    const page = pages[req.url ?? '']
    if (page === undefined) { res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}'); return }
    res.writeHead(200, { 'content-type': 'application/json', ...(page.next !== undefined ? { link: `<${page.next}>; rel="next"` } : {}) }).end(JSON.stringify(page.body))
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const client = await openRegistryClient(`127.0.0.1:${(server.address() as AddressInfo).port}`, '', { plainHttp: true, credentials: 'u:p' })
  try {
    assert.deepEqual(await client.listRepositories(), ['a', 'b', 'team/c'])
    assert.deepEqual(await client.listTags('a'), ['1', '2', '3'])
    assert.deepEqual(await client.listTags('team/c'), [])
    assert.deepEqual(await client.listTags('b'), [], 'deleted since the catalog was read')
  } finally {
    client.close()
    server.close()
  }
})
