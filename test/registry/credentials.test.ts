import assert from 'node:assert/strict'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, test } from 'node:test'
import { OriginError, UsageError } from '../../src/errors.ts'
import { parseChallenges, RegistryAuth } from '../../src/registry/auth.ts'
import { authFilePaths, findCredentials, parseCredentials } from '../../src/registry/credentials.ts'
import { Transport } from '../../src/registry/transport.ts'
import { tempDir } from '../helpers/tmp.ts'

const b64 = (text: string): string => Buffer.from(text).toString('base64')

describe('credentials', () => {
  test('USER:PASSWORD: the password may hold colons, the user name may not be empty', () => {
    assert.deepEqual(parseCredentials('alice:pa:ss', '--creds'), { username: 'alice', password: 'pa:ss' })
    assert.deepEqual(parseCredentials('alice:', '--creds'), { username: 'alice', password: '' })
    assert.throws(() => parseCredentials('alice', '--creds'), (err: unknown) => err instanceof UsageError && /--creds must be USER:PASSWORD/.test(err.message))
    assert.throws(() => parseCredentials(':secret', '--creds'), UsageError)
  })

  test('auth files are searched in the containers-auth.json(5) order, docker last', () => {
    const home = '/home/u'
    assert.deepEqual(authFilePaths({ env: {}, home }), ['/home/u/.config/containers/auth.json', '/home/u/.docker/config.json'])
    assert.deepEqual(authFilePaths({ env: { XDG_RUNTIME_DIR: '/run/user/1', XDG_CONFIG_HOME: '/cfg', DOCKER_CONFIG: '/dk' }, home }),
      ['/run/user/1/containers/auth.json', '/cfg/containers/auth.json', '/dk/config.json'])
    // REGISTRY_AUTH_FILE replaces the runtime-dir file, not the fallbacks.
    assert.deepEqual(authFilePaths({ env: { REGISTRY_AUTH_FILE: '/a.json', XDG_RUNTIME_DIR: '/run/user/1' }, home }),
      ['/a.json', '/home/u/.config/containers/auth.json', '/home/u/.docker/config.json'])
  })

  test('finds entries by host, by docker\'s legacy URL keys, and by the most specific repository key', async () => {
    const dir = await tempDir()
    const home = join(dir, 'home')
    await mkdir(join(home, '.docker'), { recursive: true })
    await writeFile(join(home, '.docker', 'config.json'), JSON.stringify({
      auths: {
        'https://index.docker.io/v1/': { auth: b64('hubuser:hubpass') },
        'reg.example:5000': { auth: b64('plain:one') },
        'reg.example:5000/team': { auth: b64('team:two') },
        'reg.example:5000/team/app': { username: 'app', password: 'three' },
        'helper.example': { identitytoken: 'opaque' }
      },
      credsStore: 'desktop'
    }))
    const opts = { env: {}, home }
    assert.deepEqual((await findCredentials('docker.io', 'library/debian', opts))?.credentials, { username: 'hubuser', password: 'hubpass' })
    assert.deepEqual((await findCredentials('reg.example:5000', 'other', opts))?.credentials, { username: 'plain', password: 'one' })
    assert.deepEqual((await findCredentials('reg.example:5000', 'team/lib', opts))?.credentials, { username: 'team', password: 'two' })
    const app = await findCredentials('reg.example:5000', 'team/app', opts)
    assert.deepEqual(app?.credentials, { username: 'app', password: 'three' })
    assert.equal(app?.file, join(home, '.docker', 'config.json'))
    assert.equal(await findCredentials('helper.example', 'x', opts), undefined, 'an identity token alone is not credentials')
    assert.equal(await findCredentials('elsewhere.example', 'x', opts), undefined)
  })

  test('REGISTRY_AUTH_FILE wins over docker\'s file; a broken file is a usage error naming it', async () => {
    const dir = await tempDir()
    const authFile = join(dir, 'auth.json')
    await writeFile(authFile, JSON.stringify({ auths: { 'reg.example': { auth: b64('podman:first') } } }))
    await mkdir(join(dir, 'docker'))
    await writeFile(join(dir, 'docker', 'config.json'), JSON.stringify({ auths: { 'reg.example': { auth: b64('docker:second') }, 'only.docker': { auth: b64('d:d') } } }))
    const env = { REGISTRY_AUTH_FILE: authFile, DOCKER_CONFIG: join(dir, 'docker') }
    assert.deepEqual((await findCredentials('reg.example', 'x', { env, home: dir }))?.credentials, { username: 'podman', password: 'first' })
    assert.deepEqual((await findCredentials('only.docker', 'x', { env, home: dir }))?.credentials, { username: 'd', password: 'd' })

    await writeFile(authFile, '{ not json')
    await assert.rejects(findCredentials('reg.example', 'x', { env, home: dir }), (err: unknown) =>
      err instanceof UsageError && err.message.includes(authFile) && /not valid JSON/.test(err.message))
  })
})

describe('WWW-Authenticate challenges', () => {
  test('bearer parameters, quoted commas and several challenges in one header', () => {
    assert.deepEqual(parseChallenges('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'), [
      { scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' } }
    ])
    assert.deepEqual(parseChallenges('Basic realm="Registry Realm", Bearer realm="https://t.example/",error=insufficient_scope'), [
      { scheme: 'basic', params: { realm: 'Registry Realm' } },
      { scheme: 'bearer', params: { realm: 'https://t.example/', error: 'insufficient_scope' } }
    ])
    assert.deepEqual(parseChallenges('Basic realm="a \\"quoted\\" realm"'), [{ scheme: 'basic', params: { realm: 'a "quoted" realm' } }])
    assert.deepEqual(parseChallenges(''), [])
  })

  test('credentials are never sent to a plain-HTTP token realm of an HTTPS registry', async () => {
    const transport = new Transport({ maxSockets: 1 })
    const auth = new RegistryAuth({ name: 'docker://reg.example', credentials: { username: 'u', password: 'p' }, plainHttp: false, transport })
    const res = new Response(null, { status: 401, headers: { 'WWW-Authenticate': 'Bearer realm="http://auth.example/token",service="reg"' } })
    await assert.rejects(auth.challenged(res, ['repository:x:pull'], AbortSignal.timeout(1000)), (err: unknown) =>
      err instanceof OriginError && err.status === 401 && /token realm http:\/\/auth\.example\/token is not HTTPS/.test(err.message))
  })

  test('a Basic challenge without credentials says how to give them', async () => {
    const auth = new RegistryAuth({ name: 'docker://reg.example', plainHttp: false, transport: new Transport({ maxSockets: 1 }) })
    const res = new Response(null, { status: 401, headers: { 'WWW-Authenticate': 'Basic realm="r"' } })
    await assert.rejects(auth.challenged(res, [], AbortSignal.timeout(1000)), (err: unknown) =>
      err instanceof OriginError && /requires credentials: log in \(docker login \/ podman login reg\.example\)/.test(err.message))
  })
})
