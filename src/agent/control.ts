import type { IncomingMessage, ServerResponse } from 'node:http'
import { chmod, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { ShoalError } from '../errors.ts'

// node:http as the CommonJS module rather than an ES import: importing it as ESM builds
// its namespace by reading every export, and the WebSocket/fetch getters among them load
// undici, http2 and zlib, about 80 ms of each `shoal stats` / `shoal ls` (docs/BENCHMARKS.md,
// "CLI start").
const { createServer, request } = process.getBuiltinModule('node:http')

/**
 * The control API: JSON over HTTP on a unix socket in the state dir, mode 0600,
 * so only root (the agent's user) can mount and unmount.
 */
/** The control socket of the agent whose state directory is stateDir. */
export const controlSocketPath = (stateDir: string): string => join(stateDir, 'agent.sock')

export type ControlHandler = (method: string, path: string, body: unknown) => Promise<unknown>

export async function startControlServer (socketPath: string, handler: ControlHandler): Promise<{ close: () => Promise<void> }> {
  await rm(socketPath, { force: true }) // a socket left by a killed agent
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      void (async () => {
        let status = 200
        let payload: unknown
        try {
          const text = Buffer.concat(chunks).toString('utf8')
          payload = await handler(req.method ?? 'GET', req.url ?? '/', text === '' ? undefined : JSON.parse(text))
        } catch (err) {
          status = err instanceof ShoalError ? 400 : 500
          payload = { error: (err as Error).message, code: (err as ShoalError).code ?? 'EINTERNAL' }
        }
        res.writeHead(status, { 'content-type': 'application/json' })
        res.end(JSON.stringify(payload ?? null))
      })()
    })
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(socketPath, () => { server.off('error', reject); resolve() })
  })
  await chmod(socketPath, 0o600)
  return {
    close: async () => {
      await new Promise<void>(resolve => { server.close(() => resolve()); server.closeAllConnections() })
      await rm(socketPath, { force: true })
    }
  }
}

export const CONTROL_CLIENT_DEFAULTS = {
  /**
   * How long a CLI call waits for the agent's answer. A mount fetches and verifies the
   * image's metadata and catalogs (the agent bounds that at 120 s itself), so the
   * client waits a little longer than the agent would work on it.
   */
  timeoutMs: 125_000
} as const

/** Thrown by the client when no agent listens on the socket. */
export class AgentNotRunningError extends ShoalError {
  constructor (socketPath: string) {
    super('ENOAGENT', `no shoal agent is running at ${socketPath}; start one with: shoal agent --state DIR --origin URL --trust KEY`)
  }
}

/**
 * Thrown by the client when talking to the agent fails other than by a refusal: the
 * agent closed the connection before answering (it crashed, or was stopped, mid-call),
 * did not answer in time, or the socket is not ours to use.
 */
export class AgentConnectionError extends ShoalError {
  constructor (message: string, options?: { cause?: unknown }) {
    super('EAGENT', message, options)
  }
}

/** The one-line error for a failure of the connection to the agent (node's errno codes). */
function connectionFailure (socketPath: string, method: string, path: string, err: NodeJS.ErrnoException, midAnswer: boolean): ShoalError {
  const code = err.code
  if (!midAnswer && (code === 'ENOENT' || code === 'ECONNREFUSED')) return new AgentNotRunningError(socketPath)
  if (code === 'EACCES' || code === 'EPERM') {
    return new AgentConnectionError(`permission denied on the agent's control socket ${socketPath}: it is for root only (the agent's user); run this command as root`, { cause: err })
  }
  if (err.name === 'TimeoutError' || code === 'ABORT_ERR' || err.name === 'AbortError') {
    return new AgentConnectionError(`the agent at ${socketPath} did not answer ${method} ${path} in time; it may be overloaded or stuck: check its log, and restart it if it stays so`, { cause: err })
  }
  if (code === 'ECONNRESET' || code === 'EPIPE' || err.message === 'aborted' || err.message === 'socket hang up') {
    const outcome = method === 'GET' ? '' : ' (whether the change was made is unknown: check with shoal ls once it runs)'
    return new AgentConnectionError(`the agent at ${socketPath} closed the connection ${midAnswer ? 'in the middle of its answer' : 'before answering'}: it has probably crashed or been stopped${outcome}; check its log (journalctl, kubectl logs), restart it with shoal agent, and try again`, { cause: err })
  }
  return new AgentConnectionError(`cannot talk to the agent at ${socketPath}: ${code ?? err.message}; check that the path is the agent's state directory and that the agent runs`, { cause: err })
}

/** Calls the agent's control API; errors the agent reports come back as ShoalErrors, and so do connection failures. */
export async function callAgent<T> (socketPath: string, method: string, path: string, body?: unknown, options: { signal?: AbortSignal } = {}): Promise<T> {
  const signal = options.signal ?? AbortSignal.timeout(CONTROL_CLIENT_DEFAULTS.timeoutMs)
  // An explicit length: Node sends a DELETE body neither chunked nor sized otherwise.
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
  return await new Promise<T>((resolve, reject) => {
    const headers = { 'content-type': 'application/json', 'content-length': String(payload?.length ?? 0) }
    let answered = false
    const fail = (err: NodeJS.ErrnoException): void => {
      // An abort reports the signal's reason (a TimeoutError for the default deadline).
      const reason = signal.aborted ? (signal.reason as NodeJS.ErrnoException) : err
      reject(reason instanceof ShoalError ? reason : connectionFailure(socketPath, method, path, reason, answered))
    }
    const req = request({ socketPath, method, path, headers, signal }, res => {
      answered = true
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        // 'end' after 'aborted' is not a complete answer; the 'error' that follows says so.
        if (!res.complete) return
        let value: unknown
        try { value = JSON.parse(Buffer.concat(chunks).toString('utf8')) } catch {
          reject(new AgentConnectionError(`the agent at ${socketPath} answered with something that is not JSON; is another program listening on its control socket?`)); return
        }
        if (res.statusCode !== 200) {
          const e = value as { error?: string, code?: string }
          reject(new ShoalError(e.code ?? 'EAGENT', e.error ?? `agent error ${res.statusCode}`)); return
        }
        resolve(value as T)
      })
      res.on('error', fail)
    })
    req.on('error', fail)
    req.end(payload)
  })
}
