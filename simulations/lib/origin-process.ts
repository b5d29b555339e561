/**
 * The origin of a simulation run, as its own process so that it can live in a
 * network namespace and be stopped and restarted (the origin-outage fault).
 *
 *   node origin-process.ts '{"dir": ..., "host": ..., "port": ..., "rate": B/s, "latencyMs": ms, "packs": [digests]}'
 *
 * It is shoal's own origin handler (createOriginHandler: the token-bucket cap
 * shared by all responses, Range, keep-alive), behind a plain node:http server
 * that first waits latencyMs per request: this kernel has no netem, so request
 * latency is added here. It prints `{"url": ...}` when listening, then every
 * 250 ms a stats line `{"t": epoch ms, "requests", "bytesSent", "packBytes",
 * "metadataBytes", "metadataRequests"}` (packs vs manifests, configs,
 * signatures and catalogs, told apart by the pack digests it was given; these
 * three count finished responses), and a last one when SIGTERM stops it.
 */
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { createOriginHandler } from '../../src/origin/server.ts'

interface Options { dir: string, host: string, port: number, rate: number, latencyMs: number, packs: string[] }
export interface OriginStatsLine { t: number, requests: number, bytesSent: number, packBytes: number, metadataBytes: number, metadataRequests: number }

const options = JSON.parse(process.argv[2]!) as Options
const packs = new Set(options.packs.map(d => `/blobs/sha256/${d.replace(/^sha256:/, '')}`))
const split = { packBytes: 0, metadataBytes: 0, metadataRequests: 0 }
const handler = await createOriginHandler({
  dir: options.dir,
  rate: options.rate,
  log: entry => {
    if (packs.has(entry.path)) split.packBytes += entry.bytes
    else {
      split.metadataBytes += entry.bytes
      split.metadataRequests++
    }
  }
})
const server = createServer((req, res) => {
  if (options.latencyMs === 0) handler.handle(req, res)
  else setTimeout(() => handler.handle(req, res), options.latencyMs)
})
// As startOriginServer does: agents hold connections across bursts of range requests.
server.keepAliveTimeout = 30_000
await new Promise<void>((resolve, reject) => {
  server.once('error', reject)
  server.listen(options.port, options.host, () => resolve())
})
const port = (server.address() as AddressInfo).port
const report = (): void => {
  const line: OriginStatsLine = { t: Date.now(), ...handler.stats, ...split }
  process.stdout.write(JSON.stringify(line) + '\n')
}
process.stdout.write(JSON.stringify({ url: `http://${options.host}:${port}`, port }) + '\n')
const timer = setInterval(report, 250)
process.once('SIGTERM', () => {
  clearInterval(timer)
  server.closeAllConnections()
  server.close(() => {
    report()
    process.exit(0)
  })
})
