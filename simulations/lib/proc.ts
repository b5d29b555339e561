/**
 * Small process helpers for the simulation harness: every wait is bounded and
 * every failure names the command.
 */
import { execFile, type ChildProcess } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { createInterface } from 'node:readline'

/** Runs CMD ARGS to completion (killed after timeoutMs) and returns stdout; rejects with stderr on failure. */
export async function exec (cmd: string, args: string[], options: { timeoutMs?: number, input?: string } = {}): Promise<string> {
  return await new Promise((resolve, reject) => {
    const child = execFile(cmd, args, { timeout: options.timeoutMs ?? 30_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err === null) resolve(stdout)
      else reject(new Error(`${cmd} ${args.join(' ')} failed: ${stderr.trim() || err.message}`, { cause: err }))
    })
    if (options.input !== undefined) child.stdin!.end(options.input)
  })
}

/** Resolves with the exit code (128 + n for a signal) when CHILD exits; already-exited children resolve at once. */
export function exited (child: ChildProcess): Promise<number> {
  const code = (): number => child.exitCode ?? (child.signalCode !== null ? 128 + signalNumber(child.signalCode) : 1)
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(code())
  return new Promise(resolve => child.once('exit', () => resolve(code())))
}

/** SIGTERM, then SIGKILL after graceMs; resolves when the process is gone. */
export async function stopChild (child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
  await exited(child)
  clearTimeout(timer)
}

/**
 * CHILD's stdout as JSON lines: resolves with the first one (its ready line),
 * then hands every later one to onLine. Rejects if it exits or stays silent for timeoutMs.
 */
export async function jsonLines<T> (child: ChildProcess, what: string, timeoutMs: number, onLine: (value: unknown) => void = () => {}): Promise<T> {
  return await new Promise<T>((resolve, reject) => {
    let ready = false
    const timer = setTimeout(() => reject(new Error(`${what} did not report within ${timeoutMs} ms`)), timeoutMs)
    createInterface({ input: child.stdout! }).on('line', line => {
      if (ready) { onLine(JSON.parse(line)); return }
      ready = true
      clearTimeout(timer)
      resolve(JSON.parse(line) as T)
    })
    child.once('exit', code => { clearTimeout(timer); if (!ready) reject(new Error(`${what} exited (code ${code}) before it was ready`)) })
  })
}

/** CPU seconds (user + system) a live process has used, from /proc/PID/stat; undefined once it is gone. */
export async function cpuSeconds (pid: number | undefined): Promise<number | undefined> {
  if (pid === undefined) return undefined
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  if (stat === undefined) return undefined
  // Fields after the command name (which may contain spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / 100 // utime, stime in clock ticks (USER_HZ = 100)
}

/** Busy and total jiffies of the whole machine, from /proc/stat, to report how loaded the CPUs were. */
export async function machineCpu (): Promise<{ busy: number, total: number }> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0]!
  const v = line.trim().split(/\s+/).slice(1).map(Number)
  const total = v.reduce((a, b) => a + b, 0)
  return { busy: total - v[3]! - v[4]!, total } // idle and iowait are not busy
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 }
function signalNumber (name: string): number { return SIGNALS[name] ?? 1 }
