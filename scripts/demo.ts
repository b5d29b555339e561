import { spawn } from 'node:child_process'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import type { AgentStats } from '../src/agent/agent.ts'
import type { AgentProcess } from '../src/agent/agent-process.ts'
import { parseSize } from '../src/cli/args.ts'
import { mib, table } from '../src/cli/output.ts'
import { parseScriptArgs } from './lib/args.ts'
import { reportErrors } from './lib/errors.ts'

const DEFAULT_COMMAND = ['python3', '-c', 'import json, sqlite3; print(json.dumps({"answer": 42, "sqlite": sqlite3.sqlite_version}))']

/**
 * The main job on a built-in default (`npm run demo`): a real Debian image with python3
 * (built with debootstrap on first use by scripts/fixtures/debian-images.ts, which is a
 * test and demo tool, not part of the product), converted and signed, served by an origin
 * with a bandwidth cap, mounted lazily by several agents that share chunks, a command run
 * in it on each, and bytes by source per agent.
 *
 *   node scripts/demo.ts [--work DIR] [--agents N] [--origin-rate BYTES/S]
 */
const USAGE = 'usage: node scripts/demo.ts [--work DIR (default /var/tmp/shoal-demo)] [--agents N (1-50, default 3)] [--origin-rate BYTES/S (default 50M)]'

async function main (): Promise<void> {
  const { values: flags, int, fail } = parseScriptArgs({
    script: 'demo',
    usage: USAGE,
    options: {
      work: { type: 'string', default: '/var/tmp/shoal-demo' },
      agents: { type: 'string', default: '3' },
      'origin-rate': { type: 'string', default: '50M' }
    }
  })
  const work = resolve(flags.work)
  const agentCount = int('agents', { min: 1, max: 50 })
  let originRate = 0
  try { originRate = parseSize(flags['origin-rate'], '--origin-rate') } catch (err) { fail((err as Error).message) }
  const say = (text: string): void => { process.stderr.write(`demo: ${text}\n`) }
  const [{ access, mkdir, rm }, { SHOAL_BIN, startAgentProcess }, { callAgent, controlSocketPath }, { convertImage }, { ensureRealFixtures }, { generateKeys, loadPrivateKey, loadPublicKey }, { verifyImage }, { DirOrigin }, { startOriginServer }] = await Promise.all([
    import('node:fs/promises'), import('../src/agent/agent-process.ts'), import('../src/agent/control.ts'), import('../src/convert/convert.ts'), import('./fixtures/debian-images.ts'),
    import('../src/format/signing.ts'), import('../src/image/verify-image.ts'), import('../src/origin/dir-origin.ts'), import('../src/origin/server.ts')])
  say('building or reusing the real Debian fixture images (debootstrap; about a minute the first time)')
  const fixtures = await ensureRealFixtures({ log: line => say(`  ${line}`) })
  await mkdir(work, { recursive: true })
  const keysDir = join(work, 'keys')
  if (!await access(join(keysDir, 'shoal.key')).then(() => true, () => false)) await generateKeys(keysDir)
  const images = join(work, 'images')
  say(`converting ${fixtures.ref('python')} into oci:${images}:python`)
  const report = await convertImage({ source: fixtures.ref('python'), dest: `oci:${images}:python`, signingKey: await loadPrivateKey(join(keysDir, 'shoal.key')) })
  const verified = await verifyImage(await DirOrigin.open(images), 'python', { trusted: [await loadPublicKey(join(keysDir, 'shoal.pub'))], workDir: join(work, 'verify') })
  say(`converted and verified ${report.manifestDigest}: ${verified.files} files, ${verified.chunks} chunks, ${mib(verified.bytes)}`)

  const origin = await startOriginServer({ dir: images, rate: originRate })
  say(`origin serving ${images} at ${origin.url}, capped at ${flags['origin-rate']}/s`)
  const agents: Array<{ name: string, state: string, process: AgentProcess }> = []
  try {
    for (let i = 0; i < agentCount; i++) {
      const state = join(work, `agent-${i}`)
      await rm(state, { recursive: true, force: true }) // a cold start every time: no cache from an earlier demo
      // Every agent bootstraps from the first one; the DHT introduces them to each other.
      const peer = agents[0]?.process.ready.multiaddrs?.[0]
      const proc = await startAgentProcess(state, ['--origin', origin.url, '--trust', join(keysDir, 'shoal.pub'), '--metrics', 'off', '--log-level', 'warn', ...(peer !== undefined ? ['--peer', peer] : [])])
      agents.push({ name: `agent-${i}`, state, process: proc })
    }
    say(`${agentCount} agents started; running ${JSON.stringify(DEFAULT_COMMAND)} on agent-0, then on the others at once`)
    const rows: string[][] = [['agent', 'exit', 'seconds', 'memory', 'disk', 'peers', 'origin']]
    const runOn = async (a: typeof agents[number]): Promise<void> => {
      const started = performance.now()
      const code = await runChild(SHOAL_BIN, ['run', 'python', '--state', a.state, '--', ...DEFAULT_COMMAND], a.name)
      const seconds = (performance.now() - started) / 1000
      const s = (await callAgent<AgentStats>(controlSocketPath(a.state), 'GET', '/v1/stats')).sources
      rows.push([a.name, String(code), seconds.toFixed(2), ...['memory', 'disk', 'peers', 'origin'].map(n => s[n] !== undefined ? mib(s[n].bytes) : '-')])
    }
    await runOn(agents[0]!)
    await Promise.all(agents.slice(1).map(runOn))
    console.log(table(rows))
    console.log(`origin sent ${mib(origin.stats.bytesSent)} in ${origin.stats.requests} requests for an image of ${mib(verified.bytes)}`)
  } finally {
    await Promise.all(agents.map(a => a.process.stop()))
    await origin.close()
  }
}

async function runChild (cmd: string, args: string[], name: string): Promise<number> {
  return await new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] })
    createInterface({ input: child.stdout! }).on('line', line => process.stdout.write(`[${name}] ${line}\n`))
    child.once('error', reject)
    child.once('exit', code => resolve(code ?? 1))
  })
}

reportErrors('demo')
await main()
