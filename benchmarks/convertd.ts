/**
 * Convert on push: the time from `skopeo copy` of the python fixture into a
 * docker-registry that notifies `shoal convertd` until the converted digest tag is
 * in the registry, next to `shoal convert docker://... docker://...` run by hand on
 * the same image in the same registry, in the same run (the two alternate which goes
 * first). Each run uses a fresh registry and a fresh convertd state (a digest
 * converts once, ever).
 *
 *   node benchmarks/convertd.ts [--runs 3]
 *
 * Prints a Markdown table and writes results/convertd.json.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { ensureRealFixtures } from '../scripts/fixtures/debian-images.ts'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { generateKeys } from '../src/format/signing.ts'
import { SHOAL } from './lib/mounts.ts'
import { Cleanup, firstLine, markdownTable, median, run, say, secs, spread, startDaemon, waitFor } from './lib/proc.ts'
import { freePort } from './lib/registry.ts'

reportErrors('convertd')
const runs = parseScriptArgs({ script: 'convertd', usage: 'usage: node benchmarks/convertd.ts [--runs 3]', options: { runs: { type: 'string', default: '3' } } }).int('runs', { min: 1 })
const TOKEN = 'bench-token-0123456789abcdef'
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'

const work = await mkdtemp(join(tmpdir(), 'shoal-bench-convertd-'))
const cleanup = new Cleanup()
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { void cleanup.runAll().then(() => process.exit(130)) })

interface RunResult { pushSeconds: number, pushToTagSeconds: number, convertdSeconds: number, byHandSeconds: number, convertdPeakRssMiB: number, load: number }

/** A docker-registry whose notifications go to URL, as docker/registry/config.yml sets it up. */
async function startNotifyingRegistry (dir: string, eventsUrl: string): Promise<{ address: string, stop: () => Promise<void> }> {
  await mkdir(join(dir, 'data'), { recursive: true })
  const port = await freePort()
  const config = join(dir, 'config.yml')
  await writeFile(config, [
    'version: 0.1',
    'log: { level: error, accesslog: { disabled: true } }',
    `storage: { filesystem: { rootdirectory: ${JSON.stringify(join(dir, 'data'))} } }`,
    `http: { addr: 127.0.0.1:${port}, secret: bench }`,
    'notifications:',
    '  endpoints:',
    `    - { name: convertd, url: ${JSON.stringify(eventsUrl)}, headers: { Authorization: ["Bearer ${TOKEN}"] }, timeout: 5s, threshold: 3, backoff: 1s, ignore: { actions: [pull] } }`,
    ''
  ].join('\n'))
  const daemon = startDaemon('registry', 'docker-registry', ['serve', config], { quiet: true })
  const address = `127.0.0.1:${port}`
  await waitFor('docker-registry answering /v2/', async () => await fetch(`http://${address}/v2/`).then(r => r.ok, () => false), 30_000, 100)
  return { address, stop: daemon.stop }
}

async function tags (address: string, repo: string): Promise<string[]> {
  const res = await fetch(`http://${address}/v2/${repo}/tags/list`)
  if (!res.ok) { await res.body?.cancel(); return [] }
  return ((await res.json()) as { tags?: string[] }).tags ?? []
}

try {
  const fixtures = await ensureRealFixtures({ log: say })
  await generateKeys(join(work, 'keys'))
  const key = join(work, 'keys', 'shoal.key')
  await writeFile(join(work, 'token'), TOKEN)
  // convertd converts python only; the copy converted by hand lives in another repository.
  await writeFile(join(work, 'rules.json'), JSON.stringify({ include: ['python:*'] }))
  const results: RunResult[] = []
  for (let i = 0; i < runs; i++) {
    const dir = join(work, `run-${i}`)
    const port = await freePort()
    const convertd = startDaemon('convertd', SHOAL, ['convertd', '--listen', `127.0.0.1:${port}`, '--state', join(dir, 'state'), '--key', key, '--rules', join(work, 'rules.json'), '--token-file', join(work, 'token'), '--plain-http', '--log-level', 'warn'])
    const stopConvertd = cleanup.add('stop convertd', convertd.stop)
    await firstLine(convertd.child, 'convertd')
    const registry = await startNotifyingRegistry(join(dir, 'registry'), `http://127.0.0.1:${port}/events`)
    const stopRegistry = cleanup.add('stop docker-registry', registry.stop)

    // By hand: the source pushed (untimed) to a repository of its own, so neither conversion finds the other's blobs.
    const convertByHand = async (): Promise<number> => {
      await run('skopeo', ['copy', '-q', '--dest-tls-verify=false', fixtures.ref('python'), `docker://${registry.address}/byhand/python:3`])
      return (await run(SHOAL, ['convert', `docker://${registry.address}/byhand/python:3`, `docker://${registry.address}/byhand/python:3-shoal`, '--key', key, '--plain-http'], { timeoutMs: 600_000 })).seconds
    }
    // Through convertd: from the end of the push until the digest tag is listed.
    const convertOnPush = async (): Promise<{ push: number, toTag: number, fromStart: number, load: number }> => {
      const load = loadavg()[0]!
      const started = performance.now()
      const push = await run('skopeo', ['copy', '-q', '--dest-tls-verify=false', fixtures.ref('python'), `docker://${registry.address}/python:3`])
      const pushed = performance.now()
      const head = await fetch(`http://${registry.address}/v2/python/manifests/3`, { method: 'HEAD', headers: { accept: ACCEPT } })
      const digestTag = `sha256-${head.headers.get('docker-content-digest')!.slice(7)}.shoal`
      await waitFor('the converted digest tag', async () => (await tags(registry.address, 'python')).includes(digestTag), 600_000, 50)
      const tagged = performance.now()
      return { push: push.seconds, toTag: (tagged - pushed) / 1000, fromStart: (tagged - started) / 1000, load }
    }
    // Alternated, so that neither always runs first while the machine's load drifts.
    let byHandSeconds: number
    let onPush: Awaited<ReturnType<typeof convertOnPush>>
    if (i % 2 === 0) { byHandSeconds = await convertByHand(); onPush = await convertOnPush() } else { onPush = await convertOnPush(); byHandSeconds = await convertByHand() }
    const load = onPush.load
    const status = JSON.parse((await run(SHOAL, ['convertd', 'status', '--state', join(dir, 'state'), '--json'])).stdout) as { jobs: Array<{ seconds?: number }> }
    // The service's peak resident memory over its whole life (one conversion): what "bounded memory" has to mean.
    const hwm = /VmHWM:\s+(\d+) kB/.exec(await readFile(`/proc/${convertd.child.pid}/status`, 'utf8'))
    const r: RunResult = { pushSeconds: onPush.push, pushToTagSeconds: onPush.toTag, convertdSeconds: status.jobs[0]?.seconds ?? NaN, byHandSeconds, convertdPeakRssMiB: Number(hwm?.[1] ?? NaN) / 1024, load }
    say(`run ${i + 1}/${runs}: skopeo push ${secs(r.pushSeconds)}, pushed to digest tag ${secs(r.pushToTagSeconds)} (convertd's job ${secs(r.convertdSeconds)}; from the start of the push ${secs(onPush.fromStart)}), shoal convert by hand ${secs(r.byHandSeconds)}, convertd peak RSS ${r.convertdPeakRssMiB.toFixed(0)} MiB, load ${load.toFixed(1)}`)
    results.push(r)
    await stopRegistry()
    await stopConvertd()
    await rm(dir, { recursive: true, force: true })
  }
  const col = (f: (r: RunResult) => number): string => `${secs(median(results.map(f)))}${spread(results.map(f), secs)}`
  console.log(markdownTable(['', `median of ${runs} (range)`], [
    ['skopeo copy of python into the registry', col(r => r.pushSeconds)],
    ['push done → converted digest tag in the registry (convertd)', col(r => r.pushToTagSeconds)],
    ['convertd\'s job alone (its status)', col(r => r.convertdSeconds)],
    ['`shoal convert docker://… docker://…` by hand', col(r => r.byHandSeconds)],
    ['convertd\'s peak RSS (VmHWM)', `${median(results.map(r => r.convertdPeakRssMiB)).toFixed(0)} MiB`],
    ['1-min load average at the push', results.map(r => r.load.toFixed(1)).join(', ')]
  ]))
  await mkdir('results', { recursive: true })
  await writeFile(join('results', 'convertd.json'), JSON.stringify({ date: new Date().toISOString(), runs: results }, null, 2) + '\n')
} finally {
  await cleanup.runAll()
  await rm(work, { recursive: true, force: true })
}
