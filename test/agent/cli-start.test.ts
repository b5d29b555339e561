import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { promisify } from 'node:util'

const run = promisify(execFile)
const MAIN = resolve(import.meta.dirname, '..', '..', 'src', 'cli', 'main.ts')
/** libp2p in any form: its packages, src/p2p/libp2p.ts, or the bundle that file loads (node_modules/.cache/shoal/libp2p.mjs). */
const LIBP2P = /libp2p|node_modules\/(@chainsafe|multiformats)\//
/** What a cheap command must not load: each costs tens to hundreds of ms at start (docs/BENCHMARKS.md, "CLI start"). */
const HEAVY = /node_modules\/(pino|better-sqlite3|fuse-native|@grpc|prom-client|tar-stream|cli-progress|yaml)\//

describe('CLI start: each command loads only its own modules', () => {
  let dir: string
  let hook: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'shoal-cli-start-'))
    hook = join(dir, 'hook.mjs')
    // Reports every module loaded, and whether undici (fetch, loaded by an ES import of node:http) was.
    await writeFile(hook, `import { registerHooks } from 'node:module'
const urls = []
registerHooks({ load (url, context, next) { urls.push(url); return next(url, context) } })
process.on('exit', () => { process.stderr.write('\\nLOADED ' + JSON.stringify({ urls, undici: process.moduleLoadList.some(m => m.includes('undici')) }) + '\\n') })
`)
  })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  async function loaded (args: string[]): Promise<{ urls: string[], undici: boolean, stdout: string }> {
    const r = await run(process.execPath, ['--import', hook, MAIN, ...args], { timeout: 60_000 }).catch((err: { stdout: string, stderr: string }) => err)
    const line = r.stderr.split('\n').find(l => l.startsWith('LOADED '))
    assert.ok(line !== undefined, `no module report in: ${r.stderr}`)
    return { ...JSON.parse(line.slice(7)) as { urls: string[], undici: boolean }, stdout: r.stdout }
  }

  test('shoal stats (no agent running) loads neither libp2p, SQLite, pino nor undici', async () => {
    const r = await loaded(['stats', '--state', join(dir, 'state')])
    assert.deepEqual(r.urls.filter(u => HEAVY.test(u) || LIBP2P.test(u)), [])
    assert.equal(r.undici, false)
  })

  test('an agent without peers or metrics (what `shoal run --no-p2p` starts) loads neither libp2p, prom-client nor the registry client', async () => {
    const keys = join(dir, 'keys')
    await run(process.execPath, [MAIN, 'keygen', '--out', keys], { timeout: 60_000 })
    const script = `
      import { Agent } from ${JSON.stringify(resolve(import.meta.dirname, '..', '..', 'src', 'agent', 'agent.ts'))}
      import { defaultConfig, validateConfig } from ${JSON.stringify(resolve(import.meta.dirname, '..', '..', 'src', 'agent', 'config.ts'))}
      const config = validateConfig({ ...defaultConfig(${JSON.stringify(join(dir, 'agent-state'))}), origins: ['http://127.0.0.1:9'], trust: [${JSON.stringify(join(keys, 'shoal.pub'))}], metrics: '', p2p: { enabled: false, listen: [], peers: [] } })
      const agent = await Agent.start(config, { control: false })
      await agent.stop()`
    const r = await run(process.execPath, ['--import', hook, '--input-type=module', '-e', script], { timeout: 60_000 })
    const line = r.stderr.split('\n').find(l => l.startsWith('LOADED '))!
    const urls = (JSON.parse(line.slice(7)) as { urls: string[] }).urls
    assert.ok(urls.some(u => u.endsWith('/src/agent/agent.ts')), 'the agent was loaded')
    assert.deepEqual(urls.filter(u => LIBP2P.test(u) || /node_modules\/(prom-client|@grpc)\/|\/src\/registry\/|node:https/.test(u)), [])
  })

  test('shoal --help lists every command; each one\'s own --help works', async () => {
    const r = await loaded(['--help'])
    const names = [...r.stdout.matchAll(/^ {2}([a-z]+)\b/gm)].map(m => m[1]!).filter(n => n !== 'help')
    for (const expected of ['convert', 'verify', 'origin', 'agent', 'mount', 'stats', 'run', 'trace']) assert.ok(names.includes(expected), `${expected} missing from --help`)
    for (const name of names) {
      const help = await run(process.execPath, [MAIN, name, '--help'], { timeout: 60_000 })
      assert.match(help.stdout, new RegExp(`^Usage: shoal ${name} `, 'm'))
    }
  })
})
