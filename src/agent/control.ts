import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http'
import { chmod, rm } from 'node:fs/promises'
import { ShoalError } from '../errors.ts'

/**
 * The control API: JSON over HTTP on a unix socket in the state dir, mode 0600,
 * so only root (the agent's user) can mount and unmount.
 */
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

/** Thrown by the client when no agent listens on the socket. */
export class AgentNotRunningError extends ShoalError {
  constructor (socketPath: string) {
    super('ENOAGENT', `no shoal agent is running at ${socketPath}; start one with: shoal agent --state DIR --origin URL --trust KEY`)
  }
}

/** Calls the agent's control API; errors the agent reports come back as ShoalErrors. */
export async function callAgent<T> (socketPath: string, method: string, path: string, body?: unknown, options: { signal?: AbortSignal } = {}): Promise<T> {
  const signal = options.signal ?? AbortSignal.timeout(120_000)
  // An explicit length: Node sends a DELETE body neither chunked nor sized otherwise.
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
  return await new Promise<T>((resolve, reject) => {
    const headers = { 'content-type': 'application/json', 'content-length': String(payload?.length ?? 0) }
    const req = request({ socketPath, method, path, headers, signal }, res => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        let value: unknown
        try { value = JSON.parse(Buffer.concat(chunks).toString('utf8')) } catch {
          reject(new ShoalError('EAGENT', `the agent at ${socketPath} answered with something that is not JSON`)); return
        }
        if (res.statusCode !== 200) {
          const e = value as { error?: string, code?: string }
          reject(new ShoalError(e.code ?? 'EAGENT', e.error ?? `agent error ${res.statusCode}`)); return
        }
        resolve(value as T)
      })
      res.on('error', reject)
    })
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new AgentNotRunningError(socketPath))
      else reject(err)
    })
    req.end(payload)
  })
}
