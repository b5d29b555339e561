import type { Command } from 'commander'
import { UsageError } from '../../errors.ts'
import { ORIGIN_SERVER_DEFAULTS } from '../../origin/server-defaults.ts'
import { parseSize } from '../args.ts'

/** A flag's whole number of at least 1 (connections, milliseconds), or a UsageError that shows how to write it. */
const positive = (flag: string, unit: string, limit: keyof typeof ORIGIN_SERVER_DEFAULTS) => (text: string): number => {
  const value = Number(text)
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < 1) throw new UsageError(`${flag} ${text}: write a whole number of ${unit}, at least 1 (default ${ORIGIN_SERVER_DEFAULTS[limit]})`)
  return value
}

/** `shoal origin serve`: a static HTTP origin for an OCI layout. */
export function registerOriginCommands (program: Command): void {
  const origin = program.command('origin').description('serve images to agents')
  origin.command('serve')
    .description('serve an OCI image layout over HTTP (GET/HEAD, Range, immutable caching) until interrupted')
    .argument('<dir>', 'OCI image layout directory')
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:8080')
    .option('--rate <bytes-per-second>', 'cap the total bandwidth, e.g. 100M (per second)')
    .option('--log-requests', 'log every request')
    .option('--send-timeout <ms>', `reset a response whose client takes no bytes for this long (default ${ORIGIN_SERVER_DEFAULTS.sendTimeoutMs})`, positive('--send-timeout', 'milliseconds', 'sendTimeoutMs'))
    .option('--max-connections <n>', `open connections in all; more are closed at accept (default ${ORIGIN_SERVER_DEFAULTS.maxConnections})`, positive('--max-connections', 'connections', 'maxConnections'))
    .option('--max-connections-per-client <n>', `open connections per client address; more are answered 503 (default ${ORIGIN_SERVER_DEFAULTS.maxConnectionsPerClient})`, positive('--max-connections-per-client', 'connections', 'maxConnectionsPerClient'))
    .option('--headers-timeout <ms>', `close a connection that has not sent its request headers within this time (default ${ORIGIN_SERVER_DEFAULTS.headersTimeoutMs})`, positive('--headers-timeout', 'milliseconds', 'headersTimeoutMs'))
    .action(async (dir: string, opts: { listen: string, rate?: string, logRequests?: boolean, sendTimeout?: number, maxConnections?: number, maxConnectionsPerClient?: number, headersTimeout?: number }) => {
      const perClient = opts.maxConnectionsPerClient ?? ORIGIN_SERVER_DEFAULTS.maxConnectionsPerClient
      const maxConnections = opts.maxConnections ?? ORIGIN_SERVER_DEFAULTS.maxConnections
      if (perClient > maxConnections) throw new UsageError(`--max-connections-per-client ${perClient} is more than --max-connections ${maxConnections}: lower it, or raise --max-connections`)
      const m = /^(.*):(\d+)$/.exec(opts.listen)
      if (m === null) throw new UsageError(`--listen ${opts.listen}: write HOST:PORT, e.g. 127.0.0.1:8080`)
      const host = m[1]!.replace(/^\[(.*)\]$/, '$1')
      const [{ default: pino }, { startOriginServer }] = await Promise.all([import('pino'), import('../../origin/server.ts')])
      const log = pino({ name: 'shoal-origin' }, pino.destination(2))
      const controller = new AbortController()
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort())
      const server = await startOriginServer({
        dir,
        host,
        port: Number(m[2]),
        signal: controller.signal,
        ...(opts.rate !== undefined ? { rate: parseSize(opts.rate, '--rate') } : {}),
        ...(opts.sendTimeout !== undefined ? { sendTimeoutMs: opts.sendTimeout } : {}),
        ...(opts.maxConnections !== undefined ? { maxConnections: opts.maxConnections } : {}),
        ...(opts.maxConnectionsPerClient !== undefined ? { maxConnectionsPerClient: opts.maxConnectionsPerClient } : {}),
        ...(opts.headersTimeout !== undefined ? { headersTimeoutMs: opts.headersTimeout } : {}),
        ...(opts.logRequests === true ? { log: (entry) => log.info(entry, 'request') } : {})
      })
      log.info({ url: server.url, dir }, 'serving')
      console.log(server.url)
      await new Promise<void>(resolve => controller.signal.addEventListener('abort', () => resolve(), { once: true }))
      await server.close()
      log.info(server.stats, 'stopped')
    })
}
