import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import { UsageError } from '../errors.ts'
import type { ResolverEvent } from '../fetch/resolver.ts'

/** The agent's Prometheus metrics, in a registry of its own (several agents may share a process in tests). */
export class AgentMetrics {
  readonly registry = new Registry()
  private readonly bytes = new Counter({ name: 'shoal_chunk_bytes_total', help: 'Chunk bytes served to readers, by the source that produced them', labelNames: ['source'], registers: [this.registry] })
  private readonly chunks = new Counter({ name: 'shoal_chunks_total', help: 'Chunks served to readers, by source', labelNames: ['source'], registers: [this.registry] })
  private readonly latency = new Histogram({
    name: 'shoal_chunk_latency_seconds',
    help: 'Time a reader waited for a chunk, by source',
    labelNames: ['source'],
    buckets: [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry]
  })
  private readonly verificationFailures = new Counter({ name: 'shoal_verification_failures_total', help: 'Chunks that failed length or SHA-256 checks, by source', labelNames: ['source'], registers: [this.registry] })
  private readonly unavailable = new Counter({ name: 'shoal_chunk_unavailable_total', help: 'Chunk resolutions that failed for good (a read got EIO)', registers: [this.registry] })
  private readonly layers = new Counter({ name: 'shoal_snapshotter_layers_total', help: 'Layers containerd asked the snapshotter for: mounted lazily, or left to containerd to download (by reason)', labelNames: ['outcome', 'reason'], registers: [this.registry] })

  constructor (gauges: { cacheBytes: () => number, cacheChunks: () => number, evictions: () => number, mounts: () => number, expiredMounts: () => number, peers: () => number }) {
    const gauge = (name: string, help: string, read: () => number): void => {
      new Gauge({ name, help, registers: [this.registry], collect () { this.set(read()) } })
    }
    gauge('shoal_cache_bytes', 'Bytes of chunks in the disk cache', gauges.cacheBytes)
    gauge('shoal_cache_chunks', 'Chunks in the disk cache', gauges.cacheChunks)
    gauge('shoal_cache_evictions', 'Chunks evicted from the disk cache since start (monotonic)', gauges.evictions)
    gauge('shoal_mounts', 'Images mounted', gauges.mounts)
    gauge('shoal_mounts_signature_expired', 'Images mounted whose signature has expired since (still served; they will not mount again until re-signed)', gauges.expiredMounts)
    gauge('shoal_connected_peers', 'Peers connected', gauges.peers)
  }

  /** The resolver's hook. */
  onResolverEvent = (event: ResolverEvent): void => {
    switch (event.type) {
      case 'resolved':
        this.bytes.inc({ source: event.source }, event.bytes)
        this.chunks.inc({ source: event.source })
        this.latency.observe({ source: event.source }, event.ms / 1000)
        break
      case 'verification-failure':
        this.verificationFailures.inc({ source: event.source })
        break
      case 'unavailable':
        this.unavailable.inc()
        break
    }
  }

  /** The lazy layers' hook. */
  onLayerOutcome = (outcome: 'lazy' | 'fallback', reason?: string): void => {
    this.layers.inc({ outcome, reason: reason ?? '' })
  }

  /** Serves GET /metrics on HOST:PORT (loopback by default); returns the bound address. */
  async listen (address: string): Promise<{ url: string, close: () => Promise<void> }> {
    const m = /^(.*):(\d+)$/.exec(address)
    if (m === null) throw new UsageError(`metrics address ${address}: write HOST:PORT, e.g. 127.0.0.1:9464`)
    const server: Server = createServer((req, res) => {
      if (req.url !== '/metrics') { res.writeHead(404).end(); return }
      this.registry.metrics().then(text => {
        res.writeHead(200, { 'content-type': this.registry.contentType }).end(text)
      }, (err: Error) => { res.writeHead(500).end(err.message) })
    })
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(Number(m[2]), m[1]!.replace(/^\[(.*)\]$/, '$1'), () => { server.off('error', reject); resolve() })
    })
    const { address: host, port } = server.address() as AddressInfo
    return {
      url: `http://${host.includes(':') ? `[${host}]` : host}:${port}/metrics`,
      close: async () => { await new Promise<void>(resolve => { server.close(() => resolve()); server.closeAllConnections() }) }
    }
  }
}
