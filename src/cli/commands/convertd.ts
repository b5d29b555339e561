import { existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import type { Command } from 'commander'
import { UsageError } from '../../errors.ts'
import { defaultConvertdConfig, loadConvertdConfigFile, validateConvertdConfig, type ConvertdConfig } from '../../convertd/config.ts'
import { CONVERTD_DEFAULTS, QUEUE_FILE } from '../../convertd/constants.ts'
import type { Job } from '../../convertd/types.ts'
import { mib, table } from '../output.ts'

// Only what the definitions need is imported here; each action imports what it runs
// (the service, SQLite, pino, the converter), as src/cli/main.ts expects of command modules.

interface ServiceFlags {
  config?: string
  state?: string
  listen?: string
  key?: string
  rules?: string
  tokenFile?: string
  registry?: string
  registryCreds?: string
  registryCa?: string
  plainHttp?: boolean
  concurrency?: string
  logLevel: string
}

/** The flags the service and sync share: where the state is, the rules, and how to reach the registry. */
function commonOptions (cmd: Command): Command {
  return cmd
    .option('--config <file>', 'JSON config file (keys as in docs/USER-GUIDE.md, "Convert on push"); flags override it')
    .option('--state <dir>', `state directory: the job queue (default ${CONVERTD_DEFAULTS.stateDir})`)
    .option('--key <file>', 'signing key (shoal keygen\'s shoal.key), unless the rules name one')
    .option('--rules <file>', 'rules: which REPO:TAG to convert, and how (JSON, or YAML for .yaml/.yml)')
    .option('--registry <host:port>', 'the registry as convertd reaches it (default: the Host each push used)')
    .option('--registry-creds <user:password>', 'credentials for the registry (default: the docker/podman login files)')
    .option('--registry-ca <file>', 'PEM CA certificate(s) to trust for the registry, besides the system ones')
    .option('--plain-http', 'reach the registry over plain HTTP instead of HTTPS')
}

async function buildConfig (flags: ServiceFlags, needs: { token: boolean }): Promise<ConvertdConfig> {
  const fromFile = flags.config !== undefined ? await loadConvertdConfigFile(flags.config) : {}
  const base = { ...defaultConvertdConfig(), ...fromFile }
  const config: ConvertdConfig = {
    ...base,
    stateDir: flags.state ?? base.stateDir,
    listen: flags.listen ?? base.listen,
    rules: flags.rules ?? base.rules,
    tokenFile: flags.tokenFile ?? base.tokenFile,
    ...(flags.key !== undefined ? { key: flags.key } : {}),
    registry: {
      ...base.registry,
      ...(flags.registry !== undefined ? { address: flags.registry } : {}),
      ...(flags.registryCreds !== undefined ? { credentials: flags.registryCreds } : {}),
      ...(flags.registryCa !== undefined ? { caFile: flags.registryCa } : {}),
      ...(flags.plainHttp === true ? { plainHttp: true } : {})
    },
    concurrency: flags.concurrency !== undefined ? Number(flags.concurrency) : base.concurrency
  }
  return validateConvertdConfig(config, needs)
}

export function registerConvertdCommands (program: Command): void {
  const convertd = commonOptions(program.command('convertd'))
    .description('convert on push: receive the registry\'s notifications and convert the images the rules name, in the background (until SIGINT/SIGTERM)')
    .option('--listen <host:port>', `address for POST /events and GET /metrics (default ${CONVERTD_DEFAULTS.listen})`)
    .option('--token-file <file>', 'file with the token the registry must send as "Authorization: Bearer TOKEN"')
    .option('--concurrency <n>', `conversions at once (default ${CONVERTD_DEFAULTS.concurrency})`)
    .option('--log-level <level>', 'debug, info, warn or error', 'info')
    .action(async (flags: ServiceFlags) => {
      const config = await buildConfig(flags, { token: true })
      const { default: pino } = await import('pino')
      const { Convertd } = await import('../../convertd/service.ts')
      const log = pino({ name: 'shoal-convertd', level: flags.logLevel }, pino.destination(2))
      // Installed before the ready line, as the agent does: a signal sent as soon as it is read must find them.
      let timer: NodeJS.Timeout | undefined
      const stopSignal = new Promise<NodeJS.Signals>(resolve => {
        const onSignal = (sig: NodeJS.Signals): void => {
          if (timer !== undefined) { log.error(`${sig} again while stopping; exiting now`); process.exit(1) }
          // Jobs still running are in the queue as running: the next start resumes them.
          timer = setTimeout(() => { log.error({ graceMs: CONVERTD_DEFAULTS.shutdownGraceMs }, 'did not stop in time; exiting (the next start resumes the running jobs)'); process.exit(1) }, CONVERTD_DEFAULTS.shutdownGraceMs)
          resolve(sig)
        }
        for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, onSignal)
      })
      const service = await Convertd.start(config, { log })
      console.log(JSON.stringify({ url: service.url, events: `${service.url}/events`, metrics: `${service.url}/metrics`, state: config.stateDir }))
      log.info({ url: service.url, state: config.stateDir, rules: config.rules }, 'convertd ready')
      const signal = await stopSignal
      log.info({ signal }, 'stopping')
      await service.stop()
      clearTimeout(timer)
      log.info('stopped')
      process.exit(0)
    })

  // The subcommands read convertd's own options (--state, --config, --rules, ...), written before or after their name.
  convertd.command('status')
    .description('jobs of convertd: queued, running, done, failed, with times and reasons (reads --state; works while the service runs)')
    .option('--limit <n>', `the most recent N jobs (default ${CONVERTD_DEFAULTS.statusLimit}; 0 = all)`)
    .option('--json', 'print as JSON: counts and jobs')
    .action(async (_flags: unknown, cmd: Command) => {
      const flags = cmd.optsWithGlobals<ServiceFlags & { limit?: string, json?: boolean }>()
      const fromFile = flags.config !== undefined ? await loadConvertdConfigFile(flags.config) : {}
      const file = join(resolve(flags.state ?? fromFile.stateDir ?? CONVERTD_DEFAULTS.stateDir), QUEUE_FILE)
      if (!existsSync(file)) throw new UsageError(`no convertd queue at ${file}: pass the --state directory the service runs with`)
      const limit = flags.limit !== undefined ? Number(flags.limit) : CONVERTD_DEFAULTS.statusLimit
      if (!Number.isSafeInteger(limit) || limit < 0) throw new UsageError(`--limit ${flags.limit}: write a number of jobs (0 = all)`)
      const { SqliteJobQueue } = await import('../../convertd/queue.ts')
      const queue = new SqliteJobQueue(file, { readonly: true })
      try {
        const counts = queue.counts()
        const jobs = queue.list({ limit: limit === 0 ? -1 : limit }).map(j => ({ ...j, names: queue.names(j.id) }))
        if (flags.json === true) { console.log(JSON.stringify({ counts, jobs }, null, 2)); return }
        console.log(Object.entries(counts).map(([s, n]) => `${s} ${n}`).join(', '))
        if (jobs.length > 0) console.log(table([['id', 'state', 'image', 'digest', 'tries', 'queued', 'ended', 'time', 'in / out'], ...jobs.map(statusRow)]))
        // Reasons are whole error messages: on lines of their own, not in a column.
        for (const j of jobs) {
          if (j.reason !== undefined) console.log(`job ${j.id} ${j.state === 'queued' ? 'retrying' : j.state}: ${j.reason}`)
          for (const n of j.names) console.log(`job ${j.id} also ${j.repository}:${n.tag} -> ${n.destTag}: ${n.state}${n.reason !== undefined ? ` (${n.reason})` : ''}`)
        }
      } finally {
        queue.close()
      }
    })

  convertd.command('sync')
    .description('backfill: walk the registry\'s catalog and tags, and queue every image the rules take that is not converted yet (the running service converts them); takes convertd\'s --state, --rules, --key, --registry and registry options')
    .action(async (_flags: unknown, cmd: Command) => {
      const flags = cmd.optsWithGlobals<ServiceFlags>()
      const config = await buildConfig(flags, { token: false })
      if (config.registry.address === undefined) throw new UsageError('sync needs the registry\'s address: pass --registry HOST:PORT (or "registry": {"address": ...} in the config)')
      const [{ loadRules }, { SqliteJobQueue }, { syncRegistry }] = await Promise.all([import('../../convertd/rules.ts'), import('../../convertd/queue.ts'), import('../../convertd/sync.ts')])
      const rules = await loadRules(config.rules, config.key)
      const queue = await SqliteJobQueue.openIn(config.stateDir)
      const controller = new AbortController()
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort())
      try {
        const report = await syncRegistry({
          registry: config.registry.address,
          access: config.registry,
          queue,
          rules,
          signal: controller.signal,
          onLine: l => { if (l.outcome !== 'ignored') console.log(`${l.outcome.padEnd(9)} ${l.image}${l.why !== undefined ? ` (${l.why})` : ''}`) }
        })
        console.log(`${report.repositories} repositories, ${report.tags} tags: ${report.queued} queued, ${report.converted} already converted, ${report.duplicate} already queued or done, ${report.ignored} not taken by the rules`)
      } finally {
        queue.close()
      }
    })
}

function statusRow (j: Job): string[] {
  const time = (ms: number | undefined): string => ms === undefined ? '' : new Date(ms).toISOString().replace('T', ' ').slice(0, 19)
  const progress = j.state === 'running' && j.bytesTotal > 0 ? `${Math.round(100 * j.bytesIn / j.bytesTotal)}%` : j.seconds !== undefined ? `${j.seconds.toFixed(1)} s` : ''
  return [
    String(j.id), j.state, `${j.registry}/${j.repository}:${j.tag}${j.platform !== undefined ? ` (${j.platform.os}/${j.platform.architecture}${j.platform.variant !== undefined ? `/${j.platform.variant}` : ''})` : ''}`,
    j.digest.slice(7, 19), String(j.attempts), time(j.createdAt), time(j.finishedAt ?? j.startedAt), progress,
    j.state === 'done' ? `${mib(j.bytesIn)} / ${mib(j.bytesOut)}` : ''
  ]
}
