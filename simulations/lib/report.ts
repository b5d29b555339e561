/**
 * What a run (real or modelled) is judged by, and how it is written down:
 * results.json (everything), summary.md (the numbers that matter, peers next to
 * the no-peers baseline) and three SVG charts.
 */
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { ClusterResult, NodeResult } from './cluster.ts'
import type { Scenario } from './scenario.ts'
import { lineChart, stackedBarChart } from './svg.ts'

export interface RunMetrics {
  nodes: number
  ok: number
  failed: number
  killed: number
  notStarted: number
  /** Completion times (workload start to end) of the nodes that finished, ms. */
  completion: { p50: number, p90: number, p99: number, max: number }
  mountP50Ms: number | undefined
  origin: { bytes: number, requests: number, packBytes: number, metadataBytes: number }
  /** Origin bytes over what a lone node pulls (its whole origin traffic): 1 is ideal, N is no sharing at all. */
  egressFactor: number
  /** The same for pack (chunk) bytes only, leaving out the metadata every node fetches itself. */
  chunkEgressFactor: number
  /** p99 completion over the lone node's completion on the same links. */
  p99OverLone: number
  /** Who uploaded: how many nodes served chunks, the most one served, and to how many distinct nodes. */
  fanOut: { uploaders: number, maxUploadBytes: number, meanUploadBytes: number, maxReceivers: number }
  peerBytes: number
  verificationFailures: number
  bannedPeers: number
}

/** A lone node on the same links: the yardstick for egress and for completion time. */
export interface LoneReference { completionMs: number, originBytes: number, originPackBytes: number }

export function loneReference (lone: ClusterResult): LoneReference {
  const node = lone.nodes[0]!
  if (node.outcome !== 'ok') throw new Error(`the lone reference run failed: ${node.error ?? node.outcome}`)
  return { completionMs: node.completionMs!, originBytes: lone.origin.bytesSent, originPackBytes: lone.origin.packBytes }
}

export function metrics (run: ClusterResult, lone: LoneReference): RunMetrics {
  const done = run.nodes.filter(n => n.outcome === 'ok')
  const times = done.map(n => n.completionMs!).sort((a, b) => a - b)
  const byPeer = new Map(run.nodes.filter(n => n.peerId !== undefined).map(n => [n.peerId!, n]))
  const receivers = new Map<number, number>()
  for (const n of run.nodes) {
    for (const [peer, bytes] of Object.entries(n.receivedFrom)) {
      const from = byPeer.get(peer)
      if (from !== undefined && bytes > 0) receivers.set(from.index, (receivers.get(from.index) ?? 0) + 1)
    }
  }
  const uploads = run.nodes.map(n => n.uploadBytes).filter(b => b > 0)
  const p99 = percentile(times, 0.99)
  return {
    nodes: run.nodes.length,
    ok: done.length,
    failed: count(run.nodes, 'failed'),
    killed: count(run.nodes, 'killed'),
    notStarted: count(run.nodes, 'not-started'),
    completion: { p50: percentile(times, 0.5), p90: percentile(times, 0.9), p99, max: times[times.length - 1] ?? NaN },
    mountP50Ms: percentileOrUndefined(run.nodes.flatMap(n => n.mountMs !== undefined ? [n.mountMs] : []), 0.5),
    origin: { bytes: run.origin.bytesSent, requests: run.origin.requests, packBytes: run.origin.packBytes, metadataBytes: run.origin.metadataBytes },
    egressFactor: run.origin.bytesSent / lone.originBytes,
    chunkEgressFactor: run.origin.packBytes / lone.originPackBytes,
    p99OverLone: p99 / lone.completionMs,
    fanOut: {
      uploaders: uploads.length,
      maxUploadBytes: Math.max(0, ...uploads),
      meanUploadBytes: uploads.length === 0 ? 0 : uploads.reduce((a, b) => a + b, 0) / uploads.length,
      maxReceivers: Math.max(0, ...receivers.values())
    },
    peerBytes: run.nodes.reduce((a, n) => a + (n.sources.peers?.bytes ?? 0), 0),
    verificationFailures: run.nodes.reduce((a, n) => a + n.verificationFailures, 0),
    bannedPeers: Math.max(0, ...run.nodes.map(n => n.bannedPeers))
  }
}

/** Nearest-rank percentile of sorted values (NaN when empty). */
function percentile (sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!
}

function percentileOrUndefined (values: number[], q: number): number | undefined {
  return values.length === 0 ? undefined : percentile(values.sort((a, b) => a - b), q)
}

function count (nodes: NodeResult[], outcome: NodeResult['outcome']): number {
  return nodes.filter(n => n.outcome === outcome).length
}

export interface Report {
  kind: 'real' | 'model'
  scenario: Scenario
  date: string
  command: string
  lone: ClusterResult
  runs: { peers?: ClusterResult, baseline: ClusterResult }
  /** Anything else worth keeping: image digest, machine, model timing, calibration. */
  extra: Record<string, unknown>
}

/** Writes results.json, summary.md and the charts into DIR; returns the metrics. */
export async function writeReport (dir: string, report: Report): Promise<Record<string, RunMetrics>> {
  await mkdir(dir, { recursive: true })
  const lone = loneReference(report.lone)
  const runs = Object.entries(report.runs).filter((e): e is [string, ClusterResult] => e[1] !== undefined)
  const m = Object.fromEntries(runs.map(([name, run]) => [name, metrics(run, lone)]))
  await writeFile(join(dir, 'results.json'), JSON.stringify({ ...report, lone: { reference: lone, run: report.lone }, metrics: m }, null, 1) + '\n')
  await writeFile(join(dir, 'completion-cdf.svg'), lineChart({
    title: `${report.scenario.name}: completion time CDF (${report.kind})`,
    xLabel: 'seconds from workload start to end',
    yLabel: 'share of nodes done',
    yMax: 1,
    series: [
      ...runs.map(([name, run]) => ({ name, points: cdf(run) })),
      { name: 'lone node', points: [[lone.completionMs / 1000, 0], [lone.completionMs / 1000, 1]], dashed: true }
    ]
  }))
  await writeFile(join(dir, 'origin-egress.svg'), lineChart({
    title: `${report.scenario.name}: origin egress over time (${report.kind})`,
    xLabel: 'seconds since the burst began',
    yLabel: 'MB sent by the origin (cumulative)',
    series: runs.map(([name, run]) => ({ name, points: run.origin.samples.filter(s => s.tMs >= 0).map(s => [s.tMs / 1000, s.bytesSent / 1e6] as [number, number]) }))
  }))
  const sourceCharts = runs.map(([name, run]) => [`bytes-by-source-${name}.svg`, stackedBarChart({
    title: `${report.scenario.name}: MB each node got, by source (${name}, ${report.kind})`,
    xLabel: run.nodes.length > 40 ? 'nodes (each bar: the mean of a group of nodes)' : 'node',
    yLabel: 'MB (uncompressed chunk bytes)',
    parts: ['origin', 'peers', 'disk'],
    bars: sourceBars(run.nodes)
  })] as const)
  for (const [file, svg] of sourceCharts) await writeFile(join(dir, file), svg)
  await writeFile(join(dir, 'summary.md'), summary(report, lone, m, sourceCharts.map(c => c[0])))
  return m
}

function cdf (run: ClusterResult): Array<[number, number]> {
  const times = run.nodes.filter(n => n.outcome === 'ok').map(n => n.completionMs! / 1000).sort((a, b) => a - b)
  const points: Array<[number, number]> = [[0, 0]]
  times.forEach((t, i) => points.push([t, i / run.nodes.length], [t, (i + 1) / run.nodes.length]))
  return points
}

/** One bar per node, or, for big runs, per group of nodes (the group's mean), so a chart stays readable. */
function sourceBars (nodes: NodeResult[]): Array<{ label: string, parts: number[] }> {
  const group = Math.ceil(nodes.length / 40)
  const bars: Array<{ label: string, parts: number[] }> = []
  for (let i = 0; i < nodes.length; i += group) {
    const slice = nodes.slice(i, i + group)
    const mean = (source: string): number => slice.reduce((a, n) => a + (n.sources[source]?.bytes ?? 0), 0) / slice.length / 1e6
    bars.push({ label: group === 1 ? String(i) : `${i}-${i + slice.length - 1}`, parts: [mean('origin'), mean('peers'), mean('disk')] })
  }
  return bars
}

const mb = (bytes: number): string => `${(bytes / 1e6).toFixed(1)} MB`
const sec = (ms: number | undefined): string => ms === undefined || Number.isNaN(ms) ? '-' : `${(ms / 1000).toFixed(2)} s`

function summary (report: Report, lone: LoneReference, m: Record<string, RunMetrics>, sourceCharts: string[]): string {
  const s = report.scenario
  const names = Object.keys(m)
  const row = (label: string, f: (x: RunMetrics) => string): string => `| ${label} | ${names.map(n => f(m[n]!)).join(' | ')} |`
  const lines = [
    `# ${s.name} (${report.kind} run, ${report.date})`,
    '',
    s.description,
    '',
    `Command: \`${report.command}\``,
    '',
    `${s.nodes} nodes, arrival ${JSON.stringify(s.arrival)}, workload ${JSON.stringify(s.workload)}, links ${s.links.mbit} Mbit/s` +
      `${s.netns ? ' (tbf in network namespaces)' : ''}, origin capped at ${s.origin.mbit} Mbit/s with ${s.origin.latencyMs} ms per request, faults ${JSON.stringify(s.faults)}.`,
    '',
    `Lone node on the same links: ${sec(lone.completionMs)}, origin sent it ${mb(lone.originBytes)} (${mb(lone.originPackBytes)} of packs).`,
    '',
    `| | ${names.join(' | ')} |`,
    `|---|${names.map(() => '---').join('|')}|`,
    row('nodes ok / failed / killed / not started', x => `${x.ok} / ${x.failed} / ${x.killed} / ${x.notStarted}`),
    row('completion p50 / p90 / p99 / max', x => `${sec(x.completion.p50)} / ${sec(x.completion.p90)} / ${sec(x.completion.p99)} / ${sec(x.completion.max)}`),
    row('p99 / lone node', x => x.p99OverLone.toFixed(2)),
    row('mount ready, p50 (time to first byte, approx.)', x => sec(x.mountP50Ms)),
    row('origin bytes (packs + metadata; the model splits completed transfers only)', x => `${mb(x.origin.bytes)} (${mb(x.origin.packBytes)} + ${mb(x.origin.metadataBytes)})`),
    row('origin requests', x => String(x.origin.requests)),
    row('origin egress factor (all bytes / lone node)', x => x.egressFactor.toFixed(2)),
    row('chunk egress factor (pack bytes / lone node)', x => x.chunkEgressFactor.toFixed(2)),
    row('bytes from peers', x => mb(x.peerBytes)),
    row('uploaders; most one uploaded; to how many nodes', x => `${x.fanOut.uploaders}; ${mb(x.fanOut.maxUploadBytes)}; ${x.fanOut.maxReceivers}`),
    row('verification failures; most peers one node banned', x => `${x.verificationFailures}; ${x.bannedPeers}`),
    '',
    '![completion CDF](completion-cdf.svg)',
    '![origin egress](origin-egress.svg)',
    ...sourceCharts.map(f => `![bytes by source](${f})`),
    ''
  ]
  for (const [name, run] of Object.entries(report.runs)) {
    if (run === undefined) continue
    if (run.events.length > 0) lines.push(`Events (${name}): ${run.events.map(e => `${sec(e.tMs)} ${e.what}`).join('; ')}`, '')
    const failures = run.nodes.filter(n => n.outcome === 'failed')
    if (failures.length > 0) lines.push(`Failures (${name}): ${failures.slice(0, 10).map(n => `node ${n.index}: ${n.error ?? `exit ${n.exitCode}`}`).join('; ')}`, '')
    for (const note of run.notes) lines.push(`Note (${name}): ${note}`, '')
    if (run.hostilePeers.length > 0) lines.push(`Hostile peers (${name}): ${hostile(run)}`, '')
    if (run.cpuBusy > 0) lines.push(`CPU (${name}): the machine's cores were ${(run.cpuBusy * 100).toFixed(0)} % busy during the burst.${loopLag(run.nodes)}`, '')
  }
  return lines.join('\n')
}

/** What the flooding peers sent and drew, and what the honest nodes' chunk servers did about it. */
function hostile (run: ClusterResult): string {
  const peers = run.hostilePeers
  const sum = (f: (h: ClusterResult['hostilePeers'][number]) => number): number => peers.reduce((a, h) => a + f(h), 0)
  const frames = (['have', 'join', 'want', 'churn'] as const).map(k => `${k} ${sum(h => h.frames[k])}`).join(', ')
  const server = (key: string): number => run.nodes.reduce((a, n) => a + (n.peer?.server[key] ?? 0), 0)
  return `${peers.length} sent ${frames} frames (${mb(sum(h => h.sentBytes))}), read ${sum(h => h.answers)} answers (${mb(sum(h => h.receivedBytes))}), ` +
    `opened ${sum(h => h.opened)} streams (${sum(h => h.closedByTarget)} closed by their targets), answered ${sum(h => h.refusedRequests)} requests of honest nodes dont-have. ` +
    `The honest nodes' chunk servers: ${['throttled', 'overRate', 'stalled', 'readsPaused', 'haveLimited', 'busyAllPeers', 'busyQueueFull'].map(k => `${k} ${server(k)}`).join(', ')}.`
}

/** The agents' event-loop delay: the median node's p99 and the worst delay anywhere. */
function loopLag (nodes: NodeResult[]): string {
  const seen = nodes.flatMap(n => n.eventLoop !== undefined ? [n.eventLoop] : [])
  if (seen.length === 0) return ''
  const p99s = seen.map(l => l.p99Ms).sort((a, b) => a - b)
  return ` Agents' event loops ran late by ${p99s[Math.floor(p99s.length / 2)]} ms at p99 (median node), ${Math.max(...seen.map(l => l.maxMs))} ms at worst.`
}
