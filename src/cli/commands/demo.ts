import { spawn } from 'node:child_process'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import type { Command } from 'commander'
import type { AgentStats } from '../../agent/agent.ts'
import type { AgentProcess } from '../../agent/agent-process.ts'
import { ShoalError } from '../../errors.ts'
import { parseSize } from '../args.ts'
import { mib, table } from '../output.ts'

const DEFAULT_COMMAND = ['python3', '-c', 'import json, sqlite3; print(json.dumps({"answer": 42, "sqlite": sqlite3.sqlite_version}))']

/**
 * The main job on a built-in default: a real Debian image with python3 (built with
 * debootstrap on first use), converted and signed, served by an origin with a
 * bandwidth cap, mounted lazily by several agents that share chunks, a command run
 * in it on each, and bytes by source per agent.
 */
export function registerDemoCommand (program: Command): void {
  program.command('demo')
    .description('end to end on a built-in real image: convert, serve, lazily mount on several agents, run python in it, report bytes by source')
    .option('--work <dir>', 'working directory (images, keys, agent state)', '/var/tmp/shoal-demo')
    .option('--agents <n>', 'number of agents', '3')
    .option('--origin-rate <bytes/s>', 'origin bandwidth cap', '50M')
    .action(async (flags: { work: string, agents: string, originRate: string }) => {
      const work = resolve(flags.work)
      const agentCount = Number(flags.agents)
      if (!Number.isInteger(agentCount) || agentCount < 1 || agentCount > 50) throw new ShoalError('EUSAGE', '--agents must be 1 to 50')
      const say = (text: string): void => { process.stderr.write(`demo: ${text}\n`) }
      const [{ access, mkdir, rm }, { SHOAL_BIN, startAgentProcess }, { callAgent, controlSocketPath }, { convertImage }, { ensureRealFixtures }, { generateKeys, loadPrivateKey, loadPublicKey }, { verifyImage }, { DirOrigin }, { startOriginServer }] = await Promise.all([
        import('node:fs/promises'), import('../../agent/agent-process.ts'), import('../../agent/control.ts'), import('../../convert/convert.ts'), import('../../fixtures/debian-images.ts'),
        import('../../format/signing.ts'), import('../../image/verify-image.ts'), import('../../origin/dir-origin.ts'), import('../../origin/server.ts')])

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

      const origin = await startOriginServer({ dir: images, rate: parseSize(flags.originRate, '--origin-rate') })
      say(`origin serving ${images} at ${origin.url}, capped at ${flags.originRate}/s`)
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
    })
}

async function runChild (cmd: string, args: string[], name: string): Promise<number> {
  return await new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] })
    createInterface({ input: child.stdout! }).on('line', line => process.stdout.write(`[${name}] ${line}\n`))
    child.once('error', reject)
    child.once('exit', code => resolve(code ?? 1))
  })
}
