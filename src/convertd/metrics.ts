import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { JobCounts } from './types.ts'

/** convertd's Prometheus metrics, in a registry of its own. */
export class ConvertdMetrics {
  readonly registry = new Registry()
  readonly events = new Counter({ name: 'shoal_convertd_events_total', help: 'Registry events received, by what was done with them (queued, duplicate, or why ignored)', labelNames: ['outcome'], registers: [this.registry] })
  readonly unauthorized = new Counter({ name: 'shoal_convertd_unauthorized_total', help: 'Requests to /events refused for a missing or wrong token', registers: [this.registry] })
  readonly finished = new Counter({ name: 'shoal_convertd_jobs_finished_total', help: 'Jobs ended since start, by state (done, failed, skipped)', labelNames: ['state'], registers: [this.registry] })
  readonly seconds = new Histogram({
    name: 'shoal_convertd_conversion_seconds',
    help: 'Time a conversion took, from its start to its tags (converted images only)',
    buckets: [1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280],
    registers: [this.registry]
  })
  readonly bytesIn = new Counter({ name: 'shoal_convertd_bytes_in_total', help: 'Source layer bytes (as stored, compressed) read by conversions', registers: [this.registry] })
  readonly bytesOut = new Counter({ name: 'shoal_convertd_bytes_out_total', help: 'Bytes uploaded to the registry by conversions (blobs already there are not counted)', registers: [this.registry] })

  constructor (counts: () => JobCounts) {
    new Gauge({
      name: 'shoal_convertd_jobs',
      help: 'Jobs in the queue, by state',
      labelNames: ['state'],
      registers: [this.registry],
      collect () { for (const [state, n] of Object.entries(counts())) this.set({ state }, n) }
    })
  }
}
