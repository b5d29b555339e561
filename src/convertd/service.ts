import { createHash, timingSafeEqual } from 'node:crypto'
import { mkdir, rm } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { ShoalError, UsageError } from '../errors.ts'
import { loadPrivateKey } from '../format/signing.ts'
import { CONVERTD_DEFAULTS, WORK_DIR } from './constants.ts'
import { readToken, type ConvertdConfig } from './config.ts'
import { parseEnvelope } from './events.ts'
import { queuePush } from './intake.ts'
import { ConvertdMetrics } from './metrics.ts'
import { SqliteJobQueue } from './queue.ts'
import { RegistryConverter } from './registry-converter.ts'
import { loadRules } from './rules.ts'
import type { Converter, JobQueue, RuleSet } from './types.ts'
import { Worker } from './worker.ts'

/** The parts a service runs on; the defaults are the real ones (tests pass fakes). */
export interface ConvertdDeps {
  log: Logger
  queue?: JobQueue
  rules?: RuleSet
  converter?: Converter
}

/**
 * `shoal convertd`: an HTTP endpoint for the registry's notifications (POST
 * /events, bearer token), the durable queue, and the workers that convert.
 * An event is answered 200 only once its jobs are committed to the queue, so the
 * registry (which retries failed deliveries) never loses a push to a crash.
 */
export class Convertd {
  /** http://HOST:PORT it listens on. */
  readonly url: string
  private readonly server: Server
  private readonly queue: JobQueue
  private readonly worker: Worker

  private constructor (parts: { url: string, server: Server, queue: JobQueue, worker: Worker }) {
    this.url = parts.url
    this.server = parts.server
    this.queue = parts.queue
    this.worker = parts.worker
  }

  static async start (config: ConvertdConfig, deps: ConvertdDeps): Promise<Convertd> {
    const { log } = deps
    await mkdir(config.stateDir, { recursive: true, mode: 0o700 })
    const workDir = join(config.stateDir, WORK_DIR)
    // Staging left by a killed run: its jobs start again from the beginning.
    await rm(workDir, { recursive: true, force: true })
    await mkdir(workDir, { mode: 0o700 })
    const token = await readToken(config.tokenFile)
    let rules = deps.rules
    if (rules === undefined) {
      const loaded = await loadRules(config.rules, config.key)
      // Checked now: without a usable key every push would be ignored or fail, quietly.
      if (loaded.signingKey === undefined) throw new UsageError(`no signing key: pass --key FILE, or set "key" in the rules file ${config.rules}`)
      await loadPrivateKey(loaded.signingKey)
      rules = loaded
    }
    const queue = deps.queue ?? await SqliteJobQueue.openIn(config.stateDir)
    const metrics = new ConvertdMetrics(() => queue.counts())
    const worker = new Worker({
      queue,
      converter: deps.converter ?? new RegistryConverter({ access: config.registry, workDir }),
      log,
      concurrency: config.concurrency,
      maxAttempts: config.maxAttempts,
      retryBaseMs: config.retryBaseMs,
      retryMaxMs: config.retryMaxMs,
      pollMs: config.pollMs,
      progressWriteMs: CONVERTD_DEFAULTS.progressWriteMs,
      onFinished: (_job, o) => {
        metrics.finished.inc({ state: o.state })
        if (o.state === 'done' && o.bytesIn > 0) metrics.seconds.observe(o.seconds)
        metrics.bytesIn.inc(o.bytesIn)
        metrics.bytesOut.inc(o.bytesOut)
      }
    })
    const expected = digestOf(`Bearer ${token}`)
    const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
      const path = new URL(req.url ?? '/', 'http://convertd').pathname
      if (path === '/metrics' && req.method === 'GET') {
        res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(await metrics.registry.metrics())
        return
      }
      if (path === '/healthz' && req.method === 'GET') { reply(res, 200, { ok: true }); return }
      if (path !== '/events') { reply(res, 404, { error: 'not found: POST /events, GET /metrics, GET /healthz' }); return }
      // Compared as fixed-length hashes: timingSafeEqual needs equal lengths, and the token's length must not leak either.
      if (!timingSafeEqual(digestOf(req.headers.authorization ?? ''), expected)) {
        metrics.unauthorized.inc()
        req.resume()
        res.setHeader('www-authenticate', 'Bearer realm="shoal-convertd"')
        reply(res, 401, { error: 'missing or wrong bearer token: configure the registry endpoint\'s headers with "Authorization: [Bearer TOKEN]" (the token in --token-file)' })
        return
      }
      if (req.method !== 'POST') { reply(res, 405, { error: 'POST notification envelopes to /events' }); return }
      const body = await readBody(req, CONVERTD_DEFAULTS.maxEnvelopeBytes)
      if (body === undefined) { reply(res, 413, { error: `envelope larger than ${CONVERTD_DEFAULTS.maxEnvelopeBytes} bytes` }); return }
      const counts: Record<string, number> = {}
      for (const verdict of parseEnvelope(body)) {
        let outcome: string
        if ('ignored' in verdict) outcome = verdict.ignored
        else {
          const { push } = verdict
          const registry = config.registry.address ?? push.host
          if (registry === undefined) outcome = 'no-registry-address'
          else {
            const r = queuePush(queue, rules, { registry, repository: push.repository, tag: push.tag, digest: push.digest }, 'event')
            outcome = r.outcome
            log.info({ image: `${registry}/${push.repository}:${push.tag}`, digest: push.digest, outcome: r.outcome, ...(r.why !== undefined ? { why: r.why } : {}), ...(r.jobId !== undefined ? { job: r.jobId } : {}) }, 'push event')
          }
        }
        metrics.events.inc({ outcome })
        counts[outcome] = (counts[outcome] ?? 0) + 1
      }
      if ((counts.queued ?? 0) + (counts['new-name'] ?? 0) > 0) worker.wake()
      reply(res, 200, counts)
    }
    const server = createServer((req, res) => {
      handle(req, res).catch((err: unknown) => {
        const status = err instanceof ShoalError && err.code === 'EFORMAT' ? 400 : 500
        log.warn({ err: err instanceof Error ? err.message : String(err), status }, 'request failed')
        if (!res.headersSent) reply(res, status, { error: err instanceof Error ? err.message : String(err) })
        else res.destroy()
      })
    })
    const m = /^(.*):(\d+)$/.exec(config.listen)!
    const host = m[1]!.replace(/^\[(.*)\]$/, '$1')
    await new Promise<void>((resolve, reject) => {
      server.once('error', err => reject(new UsageError(`cannot listen on ${config.listen}: ${err.message}`)))
      server.listen(Number(m[2]), host === '' ? '0.0.0.0' : host, resolve)
    })
    const address = server.address() as AddressInfo
    worker.start()
    return new Convertd({ url: `http://${address.family === 'IPv6' ? `[${address.address}]` : address.address}:${address.port}`, server, queue, worker })
  }

  /** Stops taking events, interrupts running conversions (queued again for the next start), closes the queue. */
  async stop (): Promise<void> {
    const closed = new Promise<void>(resolve => this.server.close(() => resolve()))
    this.server.closeAllConnections()
    await this.worker.stop()
    await closed
    this.queue.close()
  }
}

function digestOf (text: string): Buffer {
  return createHash('sha256').update(text).digest()
}

function reply (res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body) + '\n')
}

/** The request body, or undefined when it passes MAX bytes (the rest is read and dropped, so the answer still reaches the client). */
async function readBody (req: IncomingMessage, max: number): Promise<Uint8Array | undefined> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length
    if (size <= max) chunks.push(chunk)
  }
  return size > max ? undefined : Buffer.concat(chunks)
}
