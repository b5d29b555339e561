/**
 * Child processes for benchmarks: async only (a FUSE mount may be served by a
 * child we wait on, and nothing here may block the event loop), every wait
 * bounded, every long-lived process registered with a Cleanup so that it is
 * stopped in a finally block whatever failed.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process'
import { readFile, writeFile } from 'node:fs/promises'
import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'

export const say = (text: string): void => { process.stderr.write(`bench: ${text}\n`) }

export interface RunResult { code: number, stdout: string, stderr: string, seconds: number }

export interface RunOptions {
  /** Kill the command (SIGKILL) after this long; default 10 min. */
  timeoutMs?: number
  env?: NodeJS.ProcessEnv
  cwd?: string
  /** Throw unless it exits 0 (default true). */
  check?: boolean
  /** Keep at most this many bytes of each output stream (default 4 MiB; the tail is kept). */
  maxOutput?: number
  /** Where stdout goes instead of being collected: 'ignore' sends it to /dev/null. */
  stdout?: 'collect' | 'ignore'
}

/** Runs CMD ARGS to completion, timing it from spawn to exit. */
export async function run (cmd: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? 600_000
  const maxOutput = options.maxOutput ?? 4 << 20
  const started = performance.now()
  const spawnOptions: SpawnOptions = { stdio: ['ignore', options.stdout === 'ignore' ? 'ignore' : 'pipe', 'pipe'], env: options.env ?? process.env }
  if (options.cwd !== undefined) spawnOptions.cwd = options.cwd
  const child = spawn(cmd, args, spawnOptions)
  let stdout = ''
  let stderr = ''
  const keep = (text: string, add: string): string => { const t = text + add; return t.length > maxOutput ? t.slice(-maxOutput) : t }
  child.stdout?.setEncoding('utf8').on('data', (d: string) => { stdout = keep(stdout, d) })
  child.stderr?.setEncoding('utf8').on('data', (d: string) => { stderr = keep(stderr, d) })
  let timedOut = false
  const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL') }, timeoutMs)
  const code = await new Promise<number>((resolve, reject) => {
    child.once('error', err => { clearTimeout(timer); reject(new Error(`cannot start ${cmd}: ${err.message}`)) })
    child.once('close', (c, signal) => { clearTimeout(timer); resolve(c ?? (signal !== null ? 128 : 1)) })
  })
  const seconds = (performance.now() - started) / 1000
  if (timedOut) throw new Error(`\`${cmd} ${args.join(' ')}\` timed out after ${timeoutMs / 1000} s`)
  if (code !== 0 && options.check !== false) {
    throw new Error(`\`${cmd} ${args.join(' ')}\` exited with ${code}:\n${tail(stderr)}${stdout !== '' ? `\nstdout:\n${tail(stdout)}` : ''}`)
  }
  return { code, stdout, stderr, seconds }
}

function tail (text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).map(l => `  | ${l}`).join('\n')
}

/** `bash -c SCRIPT`, timed. */
export async function sh (script: string, options: RunOptions = {}): Promise<RunResult> {
  return await run('bash', ['-o', 'pipefail', '-c', script], options)
}

/** Quotes a string for bash. */
export function q (s: string): string {
  return `'${s.replaceAll("'", "'\\''")}'`
}

/**
 * A LIFO stack of clean-up steps. Each step runs once, errors are reported and do
 * not stop the next steps, and each gets a deadline so a stuck step cannot hang
 * the benchmark.
 */
export class Cleanup {
  private readonly steps: Array<{ name: string, fn: () => Promise<void> }> = []

  add (name: string, fn: () => Promise<void>): () => Promise<void> {
    const step = { name, fn }
    this.steps.push(step)
    // Running a step early removes it from the stack.
    return async () => {
      const i = this.steps.indexOf(step)
      if (i < 0) return
      this.steps.splice(i, 1)
      await step.fn()
    }
  }

  private running: Promise<void> | undefined

  /** Runs every step; a second call (a signal handler and a finally block) waits for the same run. */
  runAll (): Promise<void> {
    this.running ??= this.run()
    return this.running
  }

  private async run (): Promise<void> {
    while (this.steps.length > 0) {
      const step = this.steps.pop()!
      try {
        await Promise.race([step.fn(), sleep(60_000).then(() => { throw new Error('no end within 60 s') })])
      } catch (err) {
        say(`cleanup: ${step.name} failed: ${err instanceof Error ? err.message : String(err)}`)
      }
    }
  }
}

/** A long-lived child (agent, registry, squashfuse): its stderr goes to ours with a prefix. */
export interface Daemon { name: string, child: ChildProcess, stop: () => Promise<void> }

export function startDaemon (name: string, cmd: string, args: string[], options: { env?: NodeJS.ProcessEnv, quiet?: boolean } = {}): Daemon {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env })
  child.on('error', err => { say(`${name}: ${err.message}`) })
  if (options.quiet !== true) {
    createInterface({ input: child.stderr! }).on('line', line => { process.stderr.write(`[${name}] ${line}\n`) })
  } else {
    child.stderr!.resume()
  }
  let stopping: Promise<void> | undefined
  const stop = (): Promise<void> => {
    stopping ??= stopChild(child)
    return stopping
  }
  return { name, child, stop }
}

/** SIGTERM, then SIGKILL after 15 s; resolves once the process has exited. */
export async function stopChild (child: ChildProcess, graceMs = 15_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
  child.kill('SIGTERM')
  const done = await Promise.race([exited.then(() => true), sleep(graceMs).then(() => false)])
  if (!done) {
    child.kill('SIGKILL')
    await Promise.race([exited, sleep(5_000)])
  }
}

/** The first stdout line of CHILD (agents print one JSON line once ready), within MS. */
export async function firstLine (child: ChildProcess, name: string, ms = 60_000): Promise<string> {
  const lines = createInterface({ input: child.stdout! })
  try {
    return await Promise.race([
      new Promise<string>(resolve => lines.once('line', resolve)),
      new Promise<never>((_, reject) => child.once('exit', code => reject(new Error(`${name} exited (code ${code}) before it was ready`)))),
      sleep(ms).then(() => { throw new Error(`${name} was not ready within ${ms / 1000} s`) })
    ])
  } finally {
    lines.close()
    child.stdout!.resume()
  }
}

/** Polls CHECK every INTERVAL ms until it is true, at most MS in all. */
export async function waitFor (what: string, check: () => Promise<boolean>, ms = 30_000, interval = 50): Promise<void> {
  const deadline = performance.now() + ms
  while (performance.now() < deadline) {
    if (await check()) return
    await sleep(interval)
  }
  throw new Error(`${what}: not within ${ms / 1000} s`)
}

// ---------------------------------------------------------------------------------
// Mounts and caches

export async function mountsBelowOrAt (path: string): Promise<Array<{ mountpoint: string, fstype: string }>> {
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  const out: Array<{ mountpoint: string, fstype: string }> = []
  for (const line of text.split('\n')) {
    const fields = line.split(' ')
    const dash = fields.indexOf('-')
    if (fields.length < 5 || dash < 0) continue
    const mountpoint = fields[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))
    if (mountpoint === path || mountpoint.startsWith(path + '/')) out.push({ mountpoint, fstype: fields[dash + 1] ?? '' })
  }
  return out.sort((a, b) => b.mountpoint.length - a.mountpoint.length)
}

export async function isMounted (path: string): Promise<boolean> {
  return (await mountsBelowOrAt(path)).some(m => m.mountpoint === path)
}

/** Unmounts everything at or below DIR (deepest first), lazily if a plain unmount fails. */
export async function unmountAllBelow (dir: string): Promise<void> {
  for (const m of await mountsBelowOrAt(dir)) {
    say(`unmounting leftover ${m.fstype} mount ${m.mountpoint}`)
    const plain = await run('umount', [m.mountpoint], { check: false, timeoutMs: 30_000 })
    if (plain.code !== 0) await run('umount', ['-l', m.mountpoint], { check: false, timeoutMs: 30_000 })
  }
}

let dropWarned = false
/** sync, then drop the page cache, dentries and inodes; false (with one warning) if not allowed. */
export async function dropCaches (): Promise<boolean> {
  await run('sync', [], { timeoutMs: 120_000 })
  try {
    await writeFile('/proc/sys/vm/drop_caches', '3')
    return true
  } catch (err) {
    if (!dropWarned) say(`cannot drop the page cache (${(err as Error).message}); results then include page-cache hits`)
    dropWarned = true
    return false
  }
}

// ---------------------------------------------------------------------------------
// Numbers

export function median (xs: number[]): number {
  if (xs.length === 0) return NaN
  const s = [...xs].sort((a, b) => a - b)
  const mid = s.length >> 1
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2
}

export const mb = (bytes: number, digits = 1): string => `${(bytes / 1e6).toFixed(digits)} MB`
export const secs = (s: number): string => s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`
export const pct = (x: number, digits = 0): string => `${(x * 100).toFixed(digits)} %`
export function spread (xs: number[], fmt: (x: number) => string): string {
  return xs.length <= 1 ? '' : ` (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})`
}

export function markdownTable (header: string[], rows: string[][]): string {
  return [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`, ...rows.map(r => `| ${r.join(' | ')} |`)].join('\n')
}
