/**
 * Scenario files: one JSON file describes a fan-out experiment that both the
 * real-process runner (run.ts) and the discrete-event model (model.ts) read.
 * Everything has a default, so a scenario only states what it varies.
 *
 * Bandwidths are in megabits per second (what `tc` speaks); times in ms.
 */
import { readdirSync } from 'node:fs'
import { basename, join, relative } from 'node:path'
import { readJsonFile } from '../../scripts/lib/errors.ts'
import { UsageError } from '../../src/errors.ts'

export type Arrival =
  | { type: 'all-at-once' }
  | { type: 'staggered', intervalMs: number }
  | { type: 'poisson', ratePerSec: number }

export type Workload =
  /** A command run in the image with `shoal run IMAGE -- CMD`. */
  | { run: string[] }
  /** Files read whole (with cat) from a mount of the image. */
  | { read: string[] }

export type ImageSpec =
  /** The real python fixture (scripts/fixtures/debian-images.ts), converted on the fly with a fresh key. */
  | { fixture: 'python' }
  /** Model only: an image of `gigabytes` in `layers` layers of incompressible 1 MiB chunks, read whole (workload {"read": ["/"]}). */
  | { synthetic: { gigabytes: number, layers: number } }

export interface Faults {
  /** kill -9 of round(share × nodes) nodes, chosen with the scenario's seed, at atMs after the burst starts. */
  kill?: { share: number, atMs: number }
  /** The origin is stopped at fromMs and restarted on the same address at toMs. */
  originOutage?: { fromMs: number, toMs: number }
  /** round(share × nodes) extra peers that announce the image's packs and answer every want with corrupted bytes. */
  badPeers?: { share: number }
  /**
   * round(share × nodes) extra peers (real runs only) that join the image's swarms, hold nothing
   * (dont-have to every request), and flood every honest agent on the chunk protocol
   * (simulations/lib/hostile-peer.ts).
   */
  hostilePeers?: { share: number }
}

/** Parameters of the model that real runs calibrate (see model.ts and docs/BENCHMARKS.md). */
export interface ModelParams {
  /** Time for a DHT provide to be visible to lookups (besides its RPCs' CPU). */
  announceMs: number
  /** Time for a findProviders walk to return what it found (besides its RPCs' CPU, dhtRpcMs each). */
  lookupMs: number
  /** CPU per DHT RPC; a walk or a provide talks to the 20 closest peers (all of them in a smaller cluster). */
  dhtRpcMs: number
  /** libp2p upkeep (DHT refresh, identify, pings, peer store): CPU ms per second per connected peer (up to 20). */
  upkeepMsPerPeer: number
  /** How long a finished lookup is fresh (DhtPackRouter's cacheTtlMs, 30 s in src): a knob for what-ifs. */
  lookupCacheMs: number
  /** Mount: the agent's own work besides fetching metadata (FUSE mount, SQLite opens). */
  mountMs: number
  /** The workload's own work once every chunk is local (runc, python); default: the profile's warm run. */
  workloadCpuMs?: number
  /** Chunk reads the workload has outstanding at once (its reads plus the agent's readahead). */
  readWindow: number
  /** CPU an agent spends per MB it receives or sends (hashing, noise, FUSE copies). */
  cpuMsPerMB: number
  /** Cores shared by every node (a real run on one machine); 0 means each node has a core of its own. */
  sharedCores: number
  /** CPU to handle one request (HTTP or libp2p), on top of the link latency; it contends when cores are shared. */
  requestOverheadMs: number
  /** Transfers move in pieces of this size through round-robin link servers. */
  pieceBytes: number
}

export interface Scenario {
  name: string
  description: string
  image: ImageSpec
  nodes: number
  arrival: Arrival
  workload: Workload
  /** Every node's link: shaped with tbf in both directions (real runs with netns). */
  links: { mbit: number, latencyMs: number }
  /**
   * The origin's bandwidth cap (its token bucket) and the delay before each
   * response, and what it is: `oci-layout` (default), an OCI layout over HTTP
   * as `shoal origin serve` publishes it, where a tag lookup reads index.json;
   * or `registry` (model only), where a tag lookup is a HEAD of the manifest,
   * with no body, as RegistryOrigin and kubelet do it.
   */
  origin: { mbit: number, latencyMs: number, kind?: 'oci-layout' | 'registry' }
  peers: boolean
  /** Real runs: each agent in its own network namespace with shaped links. */
  netns: boolean
  faults: Faults
  timeouts: {
    /** The agent's --chunk-timeout. */
    chunkMs: number
    /** Bound on the whole burst; workloads still running then are stopped and count as failed. */
    runMs: number
    /** Bound on starting one agent. */
    agentStartMs: number
  }
  /** Seeds every random choice (poisson arrivals, which nodes die), so runs are repeatable. */
  seed: number
  model: ModelParams
}

export const DEFAULT_COMMAND = ['python3', '-c', 'import json, sqlite3; print(json.dumps({"answer": 42, "sqlite": sqlite3.sqlite_version}))']

/**
 * Model defaults: fitted to five real burst-20 runs at 10 and 20 nodes on
 * 2026-12-07, 12:27-13:02 UTC, at `14d81f8` (docs/BENCHMARKS.md, "Simulation:
 * calibration"; `node simulations/calibrate.ts ... --fit`), except sharedCores (those runs share this
 * machine's 2 cores; a modelled cluster does not), mountMs, lookupCacheMs and
 * pieceBytes (not fitted).
 */
export const DEFAULT_MODEL: ModelParams = {
  announceMs: 50,
  lookupMs: 50,
  dhtRpcMs: 5,
  upkeepMsPerPeer: 2,
  lookupCacheMs: 30_000,
  mountMs: 150,
  readWindow: 1,
  cpuMsPerMB: 30,
  sharedCores: 0,
  requestOverheadMs: 5,
  pieceBytes: 64 * 1024
}

const DEFAULTS: Omit<Scenario, 'name' | 'model'> = {
  description: '',
  image: { fixture: 'python' },
  nodes: 3,
  arrival: { type: 'all-at-once' },
  workload: { run: DEFAULT_COMMAND },
  links: { mbit: 1000, latencyMs: 0 },
  origin: { mbit: 100, latencyMs: 0 },
  peers: true,
  netns: false,
  faults: {},
  timeouts: { chunkMs: 20_000, runMs: 180_000, agentStartMs: 60_000 },
  seed: 1
}

/** A scenario the user must fix: a UsageError, so the scripts answer it with its message (exit 2). */
export class ScenarioError extends UsageError {
  constructor (message: string) {
    super(message)
    this.name = 'ScenarioError'
  }
}

/**
 * Reads, fills defaults and checks a scenario file; every problem names the file, and
 * the field (a UsageError: a missing file lists the scenarios there are).
 */
export async function loadScenario (path: string): Promise<Scenario> {
  const raw = await readJsonFile(path, 'scenario file', () => {
    const dir = join(import.meta.dirname, '..', 'scenarios')
    const names = readdirSync(dir).filter(f => f.endsWith('.json')).map(f => f.replace(/\.json$/, ''))
    return `the scenarios are ${relative(process.cwd(), dir)}/NAME.json, NAME one of ${names.join(', ')}`
  })
  try {
    return parseScenario(raw, basename(path).replace(/\.json$/, ''))
  } catch (err) {
    if (err instanceof ScenarioError) throw new ScenarioError(`scenario file ${path}: ${err.message.replace(/^scenario: /, '')}`)
    throw err
  }
}

export function parseScenario (raw: unknown, fallbackName: string): Scenario {
  if (!isObject(raw)) throw new ScenarioError('a scenario is a JSON object')
  const known = new Set(['name', 'model', ...Object.keys(DEFAULTS)])
  for (const key of Object.keys(raw)) if (!known.has(key)) throw new ScenarioError(`unknown scenario key "${key}" (known: ${[...known].join(', ')})`)
  // These are objects whose fields default one by one: {"links": {"mbit": 50}} keeps the default latency.
  const merged = ['links', 'origin', 'timeouts', 'model'] as const
  for (const key of merged) check(raw[key] === undefined || isObject(raw[key]), `${key} must be an object, e.g. ${JSON.stringify(key === 'model' ? { sharedCores: 2 } : (DEFAULTS)[key])}`)
  const s = {
    ...structuredClone(DEFAULTS),
    ...raw,
    name: typeof raw.name === 'string' ? raw.name : fallbackName,
    links: { ...DEFAULTS.links, ...(raw.links as object | undefined) },
    origin: { ...DEFAULTS.origin, ...(raw.origin as object | undefined) },
    timeouts: { ...DEFAULTS.timeouts, ...(raw.timeouts as object | undefined) },
    model: { ...DEFAULT_MODEL, ...(raw.model as object | undefined) }
  } as Scenario
  check(Number.isInteger(s.nodes) && s.nodes >= 1 && s.nodes <= 100_000, 'nodes must be an integer from 1 to 100000')
  check(/^[a-z0-9][a-z0-9-]*$/.test(s.name), 'name must be lowercase letters, digits and dashes')
  checkArrival(s.arrival)
  check(isObject(s.workload) && ((Array.isArray((s.workload as { run?: unknown }).run) && (s.workload as { run: unknown[] }).run.length > 0) ||
    (Array.isArray((s.workload as { read?: unknown }).read) && (s.workload as { read: unknown[] }).read.length > 0)),
  'workload must be {"run": [command...]} or {"read": [paths...]}')
  check(isObject(s.image) && ((s.image as { fixture?: unknown }).fixture === 'python' || isObject((s.image as { synthetic?: unknown }).synthetic)),
    'image must be {"fixture": "python"} or {"synthetic": {"gigabytes": G, "layers": L}}')
  if ('synthetic' in s.image) check('read' in s.workload && s.workload.read.join() === '/', 'a synthetic image is read whole: its workload must be {"read": ["/"]}')
  positive(s.links.mbit, 'links.mbit')
  nonNegative(s.links.latencyMs, 'links.latencyMs')
  positive(s.origin.mbit, 'origin.mbit')
  nonNegative(s.origin.latencyMs, 'origin.latencyMs')
  check(s.origin.kind === undefined || s.origin.kind === 'oci-layout' || s.origin.kind === 'registry', 'origin.kind must be "oci-layout" or "registry"')
  check(typeof s.peers === 'boolean' && typeof s.netns === 'boolean', 'peers and netns are true or false')
  checkFaults(s.faults)
  for (const [k, v] of Object.entries(s.timeouts)) positive(v, `timeouts.${k}`)
  check(Number.isInteger(s.seed), 'seed must be an integer')
  for (const [k, v] of Object.entries(s.model)) nonNegative(v, `model.${k}`)
  check(s.model.readWindow >= 1 && s.model.pieceBytes >= 1024, 'model.readWindow must be >= 1 and model.pieceBytes >= 1024')
  return s
}

function checkArrival (a: Arrival): void {
  check(isObject(a), 'arrival must be an object')
  if (a.type === 'staggered') positive(a.intervalMs, 'arrival.intervalMs')
  else if (a.type === 'poisson') positive(a.ratePerSec, 'arrival.ratePerSec')
  else check(a.type === 'all-at-once', 'arrival.type must be all-at-once, staggered or poisson')
}

function checkFaults (f: Faults): void {
  check(isObject(f), 'faults must be an object')
  for (const key of Object.keys(f)) check(['kill', 'originOutage', 'badPeers', 'hostilePeers'].includes(key), `unknown fault "${key}" (known: kill, originOutage, badPeers, hostilePeers)`)
  if (f.kill !== undefined) {
    share(f.kill.share, 'faults.kill.share')
    nonNegative(f.kill.atMs, 'faults.kill.atMs')
  }
  if (f.originOutage !== undefined) {
    nonNegative(f.originOutage.fromMs, 'faults.originOutage.fromMs')
    check(f.originOutage.toMs > f.originOutage.fromMs, 'faults.originOutage.toMs must be after fromMs')
  }
  if (f.badPeers !== undefined) share(f.badPeers.share, 'faults.badPeers.share')
  if (f.hostilePeers !== undefined) share(f.hostilePeers.share, 'faults.hostilePeers.share')
}

/** How many of `nodes` a share of them is (at least one when the share is positive). */
export function countOf (share: number, nodes: number): number {
  return share === 0 ? 0 : Math.max(1, Math.round(share * nodes))
}

/**
 * When each node starts its workload, in ms after the burst begins. Poisson
 * arrivals use a seeded generator, so the model and the real run see the same times.
 */
export function arrivalTimes (s: Scenario): number[] {
  const rng = seededRandom(s.seed)
  let t = 0
  return Array.from({ length: s.nodes }, (_, i) => {
    if (s.arrival.type === 'staggered') return i * s.arrival.intervalMs
    if (s.arrival.type === 'poisson') {
      if (i > 0) t += -Math.log(1 - rng()) * 1000 / s.arrival.ratePerSec
      return t
    }
    return 0
  })
}

/** The nodes the kill fault takes down: a seeded choice, the same in the model and the real run. */
export function killedNodes (s: Scenario): number[] {
  if (s.faults.kill === undefined) return []
  const rng = seededRandom(s.seed + 1)
  const order = Array.from({ length: s.nodes }, (_, i) => i)
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1))
    ;[order[i], order[j]] = [order[j]!, order[i]!]
  }
  return order.slice(0, countOf(s.faults.kill.share, s.nodes)).sort((a, b) => a - b)
}

/** mulberry32: small, fast, and good enough to pick nodes and arrival gaps. */
export function seededRandom (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export const mbitToBytes = (mbit: number): number => mbit * 125_000

function isObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}
function check (ok: boolean, message: string): void {
  if (!ok) throw new ScenarioError(`scenario: ${message}`)
}
function positive (v: unknown, what: string): void {
  check(typeof v === 'number' && v > 0 && Number.isFinite(v), `${what} must be a positive number`)
}
function nonNegative (v: unknown, what: string): void {
  check(typeof v === 'number' && v >= 0 && Number.isFinite(v), `${what} must be a number >= 0`)
}
function share (v: unknown, what: string): void {
  check(typeof v === 'number' && v >= 0 && v <= 1, `${what} must be a number from 0 to 1`)
}
