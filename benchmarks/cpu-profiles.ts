/**
 * Where processes spent their busy time: sums the samples of V8 CPU profiles
 * (`node --cpu-prof`) by package, or by shoal source file, and lists the costliest
 * functions. Idle samples are left out; lines of the libp2p bundle
 * (node_modules/.cache/shoal/libp2p.mjs) are put back under the package esbuild
 * marks them with.
 *
 *   node benchmarks/cpu-profiles.ts FILE.cpuprofile...
 *
 * For a burst's agents: NODE_OPTIONS="--cpu-prof --cpu-prof-dir=DIR" node
 * simulations/run.ts simulations/scenarios/burst-20.json --out OUT, then this over
 * the agents' profiles of the peers run (the 20 files after the lone run's, by start
 * time in their names). Profiling slows the agents: read the shares, not the totals.
 */
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'

interface CallFrame { functionName: string, url: string, lineNumber: number }
interface Profile { nodes: Array<{ id: number, callFrame: CallFrame }>, samples: number[], timeDeltas: number[] }

reportErrors('cpu-profiles')
const files = parseScriptArgs({ script: 'cpu-profiles', usage: 'usage: node benchmarks/cpu-profiles.ts FILE.cpuprofile...', options: {}, positionals: { min: 1 } }).positionals

/** The bundle's module markers (`// node_modules/PKG/...`), by line, to name a bundle line's package. */
const marks: Array<[number, string]> = []
try {
  const bundle = readFileSync(resolve(import.meta.dirname, '..', 'node_modules', '.cache', 'shoal', 'libp2p.mjs'), 'utf8')
  bundle.split('\n').forEach((line, i) => {
    const m = /^\/\/ node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(line)
    if (m !== null) marks.push([i, m[1]!])
  })
} catch {
  // no bundle: its lines, if any, count as the bundle's
}

function bundlePackage (line: number): string {
  let lo = 0
  let hi = marks.length - 1
  let found = 'libp2p bundle'
  while (lo <= hi) {
    const mid = (lo + hi) >> 1
    if (marks[mid]![0] <= line) { found = marks[mid]![1]; lo = mid + 1 } else hi = mid - 1
  }
  return found
}

function groupOf ({ functionName, url, lineNumber }: CallFrame): string {
  if (url === '') return `(${functionName || 'native'})`
  if (url.endsWith('/libp2p.mjs')) return bundlePackage(lineNumber)
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url)
  if (pkg !== null) return pkg[1]!
  const ours = /\/(src\/[^/]+\/[^/]+)$/.exec(url)
  if (ours !== null) return ours[1]!
  return url.replace(/^node:internal\//, 'node:')
}

const groups = new Map<string, number>()
const functions = new Map<string, number>()
let total = 0
for (const file of files) {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile
  const frames = new Map(profile.nodes.map(n => [n.id, n.callFrame]))
  profile.samples.forEach((id, i) => {
    const frame = frames.get(id)!
    if (frame.functionName === '(idle)') return
    const us = profile.timeDeltas[i] ?? 0
    const group = groupOf(frame)
    total += us
    groups.set(group, (groups.get(group) ?? 0) + us)
    const fn = `${frame.functionName || '(anonymous)'} (${group}:${frame.lineNumber})`
    functions.set(fn, (functions.get(fn) ?? 0) + us)
  })
}

const top = (m: Map<string, number>, n: number): string[] =>
  [...m].sort((a, b) => b[1] - a[1]).slice(0, n).map(([name, us]) => `${(100 * us / total).toFixed(1).padStart(6)} %  ${name}`)
process.stdout.write(`${files.length} profiles, ${(total / 1e6).toFixed(1)} s of busy samples\n\nby package or source file:\n${top(groups, 30).join('\n')}\n\nby function:\n${top(functions, 30).join('\n')}\n`)
