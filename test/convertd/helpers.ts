import { spawn, type ChildProcess } from 'node:child_process'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { QUEUE_FILE } from '../../src/convertd/constants.ts'
import { SqliteJobQueue } from '../../src/convertd/queue.ts'
import type { Job, JobCounts } from '../../src/convertd/types.ts'

/** What `shoal convertd` prints once it listens. */
export interface ConvertdReady { url: string, events: string, metrics: string, state: string }

export interface ConvertdProcess {
  child: ChildProcess
  ready: ConvertdReady
  /** SIGTERM, SIGKILL after graceMs; resolves when it is gone. */
  stop: (graceMs?: number) => Promise<void>
}

/** Starts `shoal convertd ARGS` with its log appended to LOG, and waits for its ready line. */
export async function startConvertd (args: string[], log: string): Promise<ConvertdProcess> {
  const fd = await open(log, 'a')
  const child = spawn(SHOAL_BIN, ['convertd', ...args], { stdio: ['ignore', 'pipe', fd.fd] })
  await fd.close()
  const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
  const stop = async (graceMs = 10_000): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    await exited
    clearTimeout(timer)
  }
  try {
    const line = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`convertd was not ready within 30 s (log: ${log})`)), 30_000)
      createInterface({ input: child.stdout! }).once('line', l => { clearTimeout(timer); resolve(l) })
      child.once('exit', code => { clearTimeout(timer); reject(new Error(`convertd exited (code ${code}) before it was ready (log: ${log})`)) })
    })
    child.stdout!.resume()
    return { child, ready: JSON.parse(line) as ConvertdReady, stop }
  } catch (err) {
    await stop(1000)
    throw err
  }
}

/** The queue as `shoal convertd status` sees it (read-only, beside the running service). */
export function readQueue (stateDir: string): { counts: JobCounts, jobs: Job[] } {
  const queue = new SqliteJobQueue(join(stateDir, QUEUE_FILE), { readonly: true })
  try { return { counts: queue.counts(), jobs: queue.list() } } finally { queue.close() }
}

/** Polls CHECK every 100 ms until it returns a value other than undefined/false, or fails after timeoutMs. */
export async function waitFor<T> (check: () => Promise<T | undefined | false> | T | undefined | false, what: string, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value !== undefined && value !== false) return value
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 100))
  }
}

/** The tags of REPO in the registry at URL ([] when the repository does not exist yet). */
export async function tagsOf (registryUrl: string, repo: string): Promise<string[]> {
  const res = await fetch(`${registryUrl}/v2/${repo}/tags/list`)
  if (res.status === 404) { await res.body?.cancel(); return [] }
  return ((await res.json()) as { tags?: string[] | null }).tags ?? []
}
