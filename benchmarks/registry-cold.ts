/**
 * Cold start with a registry as the origin: `shoal run` of the python command with the
 * agent's origin a docker-registry repository, vs the full pull (skopeo copy + umoci
 * unpack + runc) of the same image from the same registry, both through one proxy
 * capped at the same bandwidth, in the same run.
 *
 *   node benchmarks/registry-cold.ts [--runs 3] [--mbit 100]
 *
 * Prints a Markdown table and writes results/registry-cold.json.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { convertImage } from '../src/convert/convert.ts'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { generateKeys, loadPrivateKey } from '../src/format/signing.ts'
import { SHOAL } from './lib/mounts.ts'
import { Cleanup, dropCaches, markdownTable, mb, median, run, say, secs } from './lib/proc.ts'
import { startRegistry } from './lib/registry.ts'
import { startThrottleProxy } from './lib/throttle-proxy.ts'

const COMMAND = ['python3', '-c', 'import json, sqlite3; print(42)']
reportErrors('registry-cold')
const args = parseScriptArgs({
  script: 'registry-cold',
  usage: 'usage: node benchmarks/registry-cold.ts [--runs 3] [--mbit 100]',
  options: { runs: { type: 'string', default: '3' }, mbit: { type: 'string', default: '100' } }
})
const values = args.values
const runs = args.int('runs', { min: 1 })
const rate = args.number('mbit', { min: 1, max: 100_000 }) * 1e6 / 8

const work = await mkdtemp(join(tmpdir(), 'shoal-bench-registry-'))
const cleanup = new Cleanup()
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { void cleanup.runAll().then(() => process.exit(130)) })
try {
  const fixtures = await ensureRealFixtures({ log: say })
  await generateKeys(join(work, 'keys'))
  const pub = join(work, 'keys', 'shoal.pub')
  await convertImage({ source: fixtures.ref('python'), dest: `oci:${join(work, 'images')}:python`, signingKey: await loadPrivateKey(join(work, 'keys', 'shoal.key')) })

  const registry = await startRegistry(join(work, 'registry'))
  cleanup.add('stop docker-registry', registry.daemon.stop)
  const proxy = await startThrottleProxy({ upstreamPort: registry.port, rate })
  cleanup.add('close the proxy', proxy.close)
  say(`docker-registry at ${registry.address}; proxy ${proxy.address} capped at ${mb(rate)}/s; pushing both images (untimed)`)
  await run('skopeo', ['copy', '--dest-tls-verify=false', fixtures.ref('python'), `docker://${registry.address}/python:latest`], { timeoutMs: 600_000 })
  await run(SHOAL, ['push', `oci:${join(work, 'images')}:python`, `docker://${registry.address}/python:shoal`, '--plain-http'], { timeoutMs: 600_000 })

  const check42 = (stdout: string, what: string): void => { if (stdout.trim() !== '42') throw new Error(`${what} printed ${JSON.stringify(stdout.slice(0, 200))}`) }
  const shoal: Array<{ seconds: number, bytes: number }> = []
  const pull: Array<{ seconds: number, bytes: number }> = []
  for (let i = 0; i < runs; i++) {
    const state = join(work, `state-${i}`)
    await dropCaches()
    let before = proxy.stats.bytesDown
    const r = await run(SHOAL, ['run', 'shoal', '--state', state, '--origin', `docker://${proxy.address}/python`, '--registry-plain-http', '--trust', pub, '--no-p2p', '--', ...COMMAND], { timeoutMs: 300_000 })
    check42(r.stdout, 'shoal run')
    shoal.push({ seconds: r.seconds, bytes: proxy.stats.bytesDown - before })
    await rm(state, { recursive: true, force: true })

    const dir = join(work, `pull-${i}`)
    const id = `shoal-bench-registry-${process.pid}-${i}`
    await mkdir(dir)
    await dropCaches()
    before = proxy.stats.bytesDown
    const t0 = performance.now()
    try {
      await run('skopeo', ['copy', '--src-tls-verify=false', `docker://${proxy.address}/python:latest`, `oci:${join(dir, 'layout')}:python`], { timeoutMs: 600_000 })
      await run('umoci', ['unpack', '--image', `${join(dir, 'layout')}:python`, join(dir, 'bundle')], { timeoutMs: 600_000 })
      const config = join(dir, 'bundle', 'config.json')
      const spec = JSON.parse(await readFile(config, 'utf8')) as { process: { terminal: boolean, args: string[] } }
      spec.process.terminal = false
      spec.process.args = COMMAND
      await writeFile(config, JSON.stringify(spec))
      check42((await run('runc', ['run', '--bundle', join(dir, 'bundle'), id], { timeoutMs: 120_000 })).stdout, 'runc run')
      pull.push({ seconds: (performance.now() - t0) / 1000, bytes: proxy.stats.bytesDown - before })
    } finally {
      await run('runc', ['delete', '--force', id], { check: false })
      await rm(dir, { recursive: true, force: true })
    }
    say(`run ${i + 1}/${runs}: shoal ${secs(shoal.at(-1)!.seconds)} (${mb(shoal.at(-1)!.bytes, 2)}), full pull ${secs(pull.at(-1)!.seconds)} (${mb(pull.at(-1)!.bytes, 2)})`)
  }
  const ts = median(shoal.map(r => r.seconds))
  const tp = median(pull.map(r => r.seconds))
  console.log(`Cold start of \`${COMMAND.join(' ')}\`, registry behind a proxy capped at ${values.mbit} Mbit/s, median of ${runs} runs\n`)
  console.log(markdownTable(['', 'shoal run, origin = the registry', 'skopeo copy + umoci unpack + runc', 'ratio'], [
    ['wall time', secs(ts), secs(tp), `${(tp / ts).toFixed(1)}x faster`],
    ['bytes through the proxy', mb(median(shoal.map(r => r.bytes)), 2), mb(median(pull.map(r => r.bytes)), 2), '']
  ]))
  await mkdir(join(import.meta.dirname, '..', 'results'), { recursive: true })
  await writeFile(join(import.meta.dirname, '..', 'results', 'registry-cold.json'), JSON.stringify({ date: new Date().toISOString(), runs, mbit: Number(values.mbit), shoal, pull }, null, 2))
} finally {
  await cleanup.runAll()
  await rm(work, { recursive: true, force: true })
}
