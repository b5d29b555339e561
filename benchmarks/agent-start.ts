/**
 * Agent start: how long `bin/shoal agent` takes to print its ready line, and the CPU
 * seconds it has spent by then, with peers (libp2p loaded from the bundle, and from
 * its packages: SHOAL_LIBP2P_BUNDLE=off) and without (--no-p2p).
 *
 *   node benchmarks/agent-start.ts [--runs 10]      (npm run bench:agent-start)
 *
 * The agents get an origin nobody listens on (nothing is fetched at start), no metrics,
 * and with peers a listen address on loopback. The three cases alternate, after one
 * unmeasured start of each that fills the compile cache (a fresh NODE_COMPILE_CACHE,
 * as bin/shoal keeps one). CPU is the agent's user + system time from /proc/PID/stat
 * when its ready line arrives. Builds the libp2p bundle first if it is missing or stale.
 * Prints a Markdown table (stdout; progress on stderr).
 */
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { bundleLibp2p } from '../scripts/bundle-libp2p.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { generateKeys } from '../src/format/signing.ts'
import { bundleIsFresh, LIBP2P_BUNDLE, LIBP2P_BUNDLE_SOURCES } from '../src/p2p/libp2p.ts'
import { SHOAL } from './lib/mounts.ts'
import { markdownTable, median, say } from './lib/proc.ts'

reportErrors('agent-start')
const runs = parseScriptArgs({
  script: 'agent-start',
  usage: 'usage: node benchmarks/agent-start.ts [--runs 10]',
  options: { runs: { type: 'string', default: '10' } }
}).int('runs', { min: 1 })

/** USER_HZ, the unit of /proc/PID/stat's times: 100 on every Linux this runs on. */
const TICKS_PER_SECOND = 100

interface Case { name: string, args: string[], env: Record<string, string> }
const cases: Case[] = [
  { name: 'with peers, libp2p from the bundle', args: ['--listen', '/ip4/127.0.0.1/tcp/0'], env: {} },
  { name: 'with peers, libp2p from its packages (SHOAL_LIBP2P_BUNDLE=off)', args: ['--listen', '/ip4/127.0.0.1/tcp/0'], env: { SHOAL_LIBP2P_BUNDLE: 'off' } },
  { name: 'without peers (--no-p2p)', args: ['--no-p2p'], env: {} }
]

const work = await mkdtemp(join(tmpdir(), 'shoal-bench-start-'))
try {
  if (!bundleIsFresh(LIBP2P_BUNDLE, LIBP2P_BUNDLE_SOURCES)) {
    say('the libp2p bundle is missing or stale: building it')
    await bundleLibp2p()
  }
  const { publicPath } = await generateKeys(join(work, 'keys'))
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_COMPILE_CACHE: join(work, 'compile-cache') }
  delete env.SHOAL_LIBP2P_BUNDLE // the cases set it
  let starts = 0

  /** One start: ms to the ready line, and CPU seconds by then. */
  async function start (c: Case): Promise<{ ms: number, cpu: number }> {
    const state = join(work, `state-${starts++}`)
    const args = ['agent', '--state', state, '--origin', 'http://127.0.0.1:9/', '--trust', publicPath, '--metrics', 'off', '--log-level', 'warn', ...c.args]
    const started = performance.now()
    const child = spawn(SHOAL, args, { env: { ...env, ...c.env }, stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
    const exited = new Promise<void>(resolve => child.once('exit', () => { resolve() }))
    try {
      const ready = await Promise.race([
        new Promise<true>(resolve => createInterface({ input: child.stdout }).once('line', () => { resolve(true) })),
        exited.then(() => false as const)
      ])
      const ms = performance.now() - started
      if (!ready) throw new Error(`${c.name}: the agent exited before it was ready: ${stderr}`)
      const fields = (await readFile(`/proc/${child.pid}/stat`, 'utf8')).split(') ')[1]!.split(' ')
      return { ms, cpu: (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND } // utime, stime
    } finally {
      child.kill('SIGTERM')
      await exited
      await rm(state, { recursive: true, force: true })
    }
  }

  say(`warm-up: one start of each case, then ${runs} rounds`)
  for (const c of cases) await start(c)
  const results = new Map(cases.map(c => [c, { ms: [] as number[], cpu: [] as number[] }]))
  const loads = [loadavg()[0]!]
  for (let round = 1; round <= runs; round++) {
    for (const c of cases) {
      const r = await start(c)
      results.get(c)!.ms.push(r.ms)
      results.get(c)!.cpu.push(r.cpu)
    }
    loads.push(loadavg()[0]!)
    say(`round ${round}/${runs}`)
  }

  const three = (xs: number[], fmt: (x: number) => string): string => [Math.min(...xs), median(xs), Math.max(...xs)].map(fmt).join(' / ')
  process.stdout.write(`Agent start, ${runs} runs each, alternating; node ${process.version}; load average ${Math.min(...loads).toFixed(2)}-${Math.max(...loads).toFixed(2)}\n\n`)
  process.stdout.write(markdownTable(['case', 'ready, ms (min / median / max)', 'CPU, s (min / median / max)'],
    cases.map(c => [c.name, three(results.get(c)!.ms, x => x.toFixed(0)), three(results.get(c)!.cpu, x => x.toFixed(2))])) + '\n')
} finally {
  await rm(work, { recursive: true, force: true })
}
