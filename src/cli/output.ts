import { createRequire } from 'node:module'

// cli-progress is loaded only when a bar is shown on a terminal: the commands that print
// tables (shoal stats, ls) must not pay for it at start.
const require = createRequire(import.meta.url)

/** A progress bar on a terminal; nothing when stderr is a pipe or a file (CI, logs). */
export function progressBar (label: string, unit: 'bytes' | 'items'): { update: (done: number, total: number) => void, stop: () => void } {
  if (process.stderr.isTTY !== true) return { update: () => {}, stop: () => {} }
  const format = unit === 'bytes'
    ? `${label} [{bar}] {percentage}% | {doneMiB}/{totalMiB} MiB | {eta_formatted}`
    : `${label} [{bar}] {percentage}% | {value}/{total} | {eta_formatted}`
  const cliProgress = require('cli-progress') as typeof import('cli-progress')
  const bar = new cliProgress.SingleBar({ format, stream: process.stderr, hideCursor: true, clearOnComplete: true }, cliProgress.Presets.shades_classic)
  let started = false
  return {
    update (done, total) {
      const payload = { doneMiB: (done / 1048576).toFixed(1), totalMiB: (total / 1048576).toFixed(1) }
      if (!started) { bar.start(total, done, payload); started = true } else bar.update(done, payload)
    },
    stop () { if (started) bar.stop() }
  }
}

export function mib (bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`
}

/** A plain aligned table for terminal output. */
export function table (rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map(r => (r[i] ?? '').length)))
  return rows.map(r => r.map((c, i) => i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)).join('  ').trimEnd()).join('\n')
}
