import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { Agent as HttpAgent, request } from 'node:http'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { after, before, describe, test } from 'node:test'
import { SHOAL_BIN, startAgentProcess } from '../../src/agent/agent-process.ts'
import { defaultConfig, validateConfig } from '../../src/agent/config.ts'
import { callAgent } from '../../src/agent/control.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { UsageError } from '../../src/errors.ts'
import { createOriginHandler } from '../../src/origin/server.ts'
import { testServer, type TestServer } from '../origin/helpers.ts'
import { runTool } from '../helpers/exec.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * Issue 15: the hardening limits are reachable where operators set things:
 * HttpOrigin's `redirectHosts` as the agent's `--redirect-host` (config key
 * redirectHosts), and the origin server's limits (ORIGIN_SERVER_DEFAULTS) as
 * `shoal origin serve` flags; wrong values are refused with what to write instead.
 */

// At the file's level: a temp dir asked for in a hook would be removed when the hook ends.
const redirectDir = await tempDir('shoal-redirect-')
const flagsDir = await tempDir('shoal-origin-flags-')

/** Runs `shoal ARGS`, expecting it to fail at once; its exit code and stderr. */
async function refused (args: string[]): Promise<{ code: number, stderr: string }> {
  try {
    await runTool(SHOAL_BIN, args, { timeoutMs: 30_000 })
  } catch (err) {
    const message = (err as Error).message
    return { code: Number(/\(exit (\d+)\)/.exec(message)?.[1]), stderr: message }
  }
  assert.fail(`shoal ${args.join(' ')} succeeded`)
}

describe('agent: --redirect-host', () => {
  let dir: string
  let pub: string
  let other: TestServer
  let front: TestServer

  before(async () => {
    dir = redirectDir
    const keys = generateKeyPairSync('ed25519')
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'file', path: 'hello', content: 'hello through a redirect\n' }]])
    await convertImage({ source: src.ref, dest: `oci:${join(dir, 'images')}:t`, signingKey: keys.privateKey })
    pub = join(dir, 'shoal.pub')
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    const handler = await createOriginHandler({ dir: join(dir, 'images') })
    // The layout is served by OTHER (another port: another origin); FRONT redirects everything there, as an origin handing off to a CDN.
    other = await testServer((req, res) => handler.handle(req, res))
    front = await testServer((req, res) => res.writeHead(302, { Location: `${other.url}${req.url ?? '/'}` }).end())
  })
  after(async () => {
    await front?.close()
    await other?.close()
  })

  test('a malformed host is refused with what to write', () => {
    for (const host of ['http://cdn.example.com', 'cdn.example.com/blobs', 'user@cdn', '']) {
      assert.throws(() => validateConfig({ ...defaultConfig(dir), origins: [front.url], trust: [pub], redirectHosts: [host] }), (err: unknown) => {
        assert.ok(err instanceof UsageError, String(err))
        assert.match(err.message, /write HOST or HOST:PORT .*--redirect-host cdn\.example\.com/)
        return true
      }, host)
    }
    assert.throws(() => validateConfig({ ...defaultConfig(dir), origins: [front.url], trust: [pub], redirectHosts: 'cdn' as unknown as string[] }), /redirectHosts must be a list of hosts/)
    for (const host of ['cdn.example.com', '10.0.0.5:9000', '[::1]:8080']) {
      assert.deepEqual(validateConfig({ ...defaultConfig(dir), origins: [front.url], trust: [pub], redirectHosts: [host] }).redirectHosts, [host])
    }
  })

  test('`shoal agent --redirect-host` with a URL fails at once, exit 2, one line', async () => {
    const { code, stderr } = await refused(['agent', '--state', join(dir, 'bad'), '--origin', front.url, '--trust', pub, '--redirect-host', 'https://cdn.example.com'])
    assert.equal(code, 2)
    assert.match(stderr, /shoal: redirect host "https:\/\/cdn\.example\.com" is not a host: write HOST or HOST:PORT/)
  })

  for (const trusted of [false, true]) {
    test(trusted ? 'with --redirect-host naming the other host, the agent follows the redirects and mounts' : 'without --redirect-host, a mount whose origin redirects elsewhere fails and says which flag trusts the host', { timeout: 120_000 }, async () => {
      const state = join(dir, trusted ? 'state-trusted' : 'state-untrusted')
      const mnt = join(dir, trusted ? 'mnt-trusted' : 'mnt-untrusted')
      const agent = await startAgentProcess(state, ['--origin', front.url, '--trust', pub, '--metrics', 'off', '--log-level', 'error', '--no-p2p',
        ...(trusted ? ['--redirect-host', new URL(other.url).host] : [])], { stderr: 'ignore' })
      try {
        const mounting = callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt }, { signal: AbortSignal.timeout(60_000) })
        if (trusted) {
          await mounting
          assert.equal((await runTool('cat', [join(mnt, 'hello')])).stdout, 'hello through a redirect\n')
        } else {
          await assert.rejects(mounting, (err: unknown) => {
            assert.match((err as Error).message, /which this origin does not trust.*shoal agent --redirect-host 127\.0\.0\.1:\d+/s)
            return true
          })
        }
      } finally {
        await agent.stop()
        await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
      }
    })
  }
})

describe('origin serve: limit flags', () => {
  let layout: string
  before(async () => {
    const dir = flagsDir
    const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'file', path: 'x', content: 'x' }]])
    layout = join(dir, 'images')
    await convertImage({ source: src.ref, dest: `oci:${layout}:t`, signingKey: generateKeyPairSync('ed25519').privateKey })
  })

  test('a limit that is not a whole number of at least 1 is refused with what to write, before anything listens', async () => {
    for (const [flag, value, unit] of [['--send-timeout', '0', 'milliseconds'], ['--max-connections', '-5', 'connections'], ['--max-connections-per-client', 'many', 'connections'], ['--headers-timeout', '1.5', 'milliseconds']] as const) {
      const { code, stderr } = await refused(['origin', 'serve', layout, '--listen', '127.0.0.1:0', flag, value])
      assert.equal(code, 2, flag)
      assert.match(stderr, new RegExp(`shoal: ${flag} ${value}: write a whole number of ${unit}, at least 1 \\(default \\d+\\)`), flag)
    }
    const { stderr } = await refused(['origin', 'serve', layout, '--listen', '127.0.0.1:0', '--max-connections', '4', '--max-connections-per-client', '8'])
    assert.match(stderr, /--max-connections-per-client 8 is more than --max-connections 4: lower it, or raise --max-connections/)
  })

  test('--max-connections-per-client reaches the server', { timeout: 60_000 }, async () => {
    const child: ChildProcess = spawn(SHOAL_BIN, ['origin', 'serve', layout, '--listen', '127.0.0.1:0', '--max-connections-per-client', '1'], { stdio: ['ignore', 'pipe', 'ignore'] })
    try {
      const url = await new Promise<string>((resolve, reject) => {
        createInterface({ input: child.stdout! }).once('line', resolve)
        child.once('exit', code => reject(new Error(`shoal origin serve exited (${code})`)))
      })
      // One connection held open (keep-alive), then a second from the same address: over the cap.
      const get = async (agent: HttpAgent | false): Promise<number> => await new Promise((resolve, reject) => {
        request(`${url}/index.json`, { agent }, res => { res.resume(); resolve(res.statusCode!) }).on('error', reject).end()
      })
      const keepAlive = new HttpAgent({ keepAlive: true, maxSockets: 1 })
      assert.equal(await get(keepAlive), 200)
      assert.equal(await get(false), 503, 'a second connection from the same address is refused')
      keepAlive.destroy()
    } finally {
      child.kill('SIGTERM')
    }
  })
})
