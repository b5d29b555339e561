import { spawn, type ChildProcess } from 'node:child_process'
import { resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { ShoalError } from '../errors.ts'
import { controlSocketPath } from './control.ts'

export const SHOAL_BIN = resolve(import.meta.dirname, '..', '..', 'bin', 'shoal')

/** What `shoal agent` prints on stdout once it is ready. */
export interface AgentReady { socket: string, metrics?: string, peerId?: string, multiaddrs?: string[] }

export interface AgentProcess {
  readonly child: ChildProcess
  readonly stateDir: string
  readonly socket: string
  readonly ready: AgentReady
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
  stop (graceMs?: number): Promise<void>
}

/**
 * Starts `shoal agent --state STATE ARGS...` as a child process and waits (bounded)
 * until it reports ready. Used by the demo, the tests and the simulation harness.
 * Its log (stderr) goes to the caller's stderr, nowhere, an open file descriptor, or
 * a pipe (`'pipe'`: the caller must read `child.stderr`, or a full pipe blocks the agent).
 * `env` replaces the environment (tests put fakes first on PATH).
 */
export async function startAgentProcess (stateDir: string, args: string[], options: { timeoutMs?: number, stderr?: 'inherit' | 'ignore' | 'pipe' | number, command?: string[], env?: NodeJS.ProcessEnv } = {}): Promise<AgentProcess> {
  const [cmd, ...prefix] = options.command ?? [SHOAL_BIN]
  const child = spawn(cmd!, [...prefix, 'agent', '--state', stateDir, ...args], { stdio: ['ignore', 'pipe', options.stderr ?? 'inherit'], ...(options.env !== undefined ? { env: options.env } : {}) })
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
      const timer = setTimeout(() => reject(new ShoalError('EAGENT', `agent ${stateDir} was not ready within ${options.timeoutMs ?? 60_000} ms`)), options.timeoutMs ?? 60_000)
      createInterface({ input: child.stdout! }).once('line', l => { clearTimeout(timer); resolve(l) })
      child.once('exit', code => { clearTimeout(timer); reject(new ShoalError('EAGENT', `agent ${stateDir} exited (code ${code}) before it was ready`)) })
      child.once('error', err => { clearTimeout(timer); reject(err) })
    })
    const ready = JSON.parse(line) as AgentReady
    child.stdout!.resume() // keep draining: a full pipe would block the agent
    return { child, stateDir, socket: controlSocketPath(stateDir), ready, stop }
  } catch (err) {
    await stop(1000)
    throw err
  }
}
