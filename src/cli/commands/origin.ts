import type { Command } from 'commander'
import pino from 'pino'
import { UsageError } from '../../errors.ts'
import { startOriginServer } from '../../origin/server.ts'
import { parseSize } from './image.ts'

/** `shoal origin serve`: a static HTTP origin for an OCI layout. */
export function registerOriginCommands (program: Command): void {
  const origin = program.command('origin').description('serve images to agents')
  origin.command('serve')
    .description('serve an OCI image layout over HTTP (GET/HEAD, Range, immutable caching) until interrupted')
    .argument('<dir>', 'OCI image layout directory')
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:8080')
    .option('--rate <bytes-per-second>', 'cap the total bandwidth, e.g. 100M (per second)')
    .option('--log-requests', 'log every request')
    .action(async (dir: string, opts: { listen: string, rate?: string, logRequests?: boolean }) => {
      const m = /^(.*):(\d+)$/.exec(opts.listen)
      if (m === null) throw new UsageError(`--listen ${opts.listen}: write HOST:PORT, e.g. 127.0.0.1:8080`)
      const host = m[1]!.replace(/^\[(.*)\]$/, '$1')
      const log = pino({ name: 'shoal-origin' }, pino.destination(2))
      const controller = new AbortController()
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort())
      const server = await startOriginServer({
        dir,
        host,
        port: Number(m[2]),
        signal: controller.signal,
        ...(opts.rate !== undefined ? { rate: parseSize(opts.rate, '--rate') } : {}),
        ...(opts.logRequests === true ? { log: (entry) => log.info(entry, 'request') } : {})
      })
      log.info({ url: server.url, dir }, 'serving')
      console.log(server.url)
      await new Promise<void>(resolve => controller.signal.addEventListener('abort', () => resolve(), { once: true }))
      await server.close()
      log.info(server.stats, 'stopped')
    })
}
