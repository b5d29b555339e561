import { execFile } from 'node:child_process'

export interface ToolOptions {
  signal?: AbortSignal
  /** Default 5 minutes: tests must fail, not hang, when a tool wedges. */
  timeoutMs?: number
}

/**
 * Runs an external tool (umoci, skopeo, ...) asynchronously and returns its output.
 * Failures name the command and carry its stderr; a missing tool says how to get it.
 */
export async function runTool (command: string, args: string[], options: ToolOptions = {}): Promise<{ stdout: string, stderr: string }> {
  const timeout = options.timeoutMs ?? 5 * 60_000
  return await new Promise((resolve, reject) => {
    execFile(command, args, { signal: options.signal, timeout, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err === null) { resolve({ stdout, stderr }); return }
      const line = [command, ...args].join(' ')
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        reject(new Error(`${command} is not installed (it is a Debian package: apt-get install ${command})`, { cause: err }))
      } else if (err.killed === true && options.signal?.aborted !== true) {
        reject(new Error(`${line} timed out after ${timeout} ms\n${stderr}`, { cause: err }))
      } else {
        reject(new Error(`${line} failed (exit ${String(err.code)})\n${stderr}`, { cause: err }))
      }
    })
  })
}
