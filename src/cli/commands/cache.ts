import { join, resolve } from 'node:path'
import type { Command } from 'commander'
import { DEFAULT_STATE_DIR } from '../../agent/constants.ts'

/**
 * `shoal cache verify`: hash every chunk in an agent's disk cache and delete the
 * bad ones (src/cache/verify.ts). The agent verifies a chunk when it enters the
 * node and trusts its cache afterwards; this is the full check, for after a disk
 * error or on a schedule. The work is loaded only when the command runs.
 */
export function registerCacheCommands (program: Command): void {
  const cache = program.command('cache').description('the agent\'s disk cache of chunks')
  cache.command('verify')
    .description('hash every cached chunk and delete those that do not match their digest (safe while the agent runs)')
    .option('--state <dir>', `the agent's state directory (default ${DEFAULT_STATE_DIR})`)
    .option('--json', 'print the result as JSON')
    .action(async (flags: { state?: string, json?: boolean }) => {
      const [{ verifyCacheDir }, { mib, progressBar }] = await Promise.all([import('../../cache/verify.ts'), import('../output.ts')])
      const dir = join(resolve(flags.state ?? DEFAULT_STATE_DIR), 'cache')
      const controller = new AbortController()
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort(new Error(`stopped by ${sig}; nothing was left half done, run it again to check everything`)))
      const bar = progressBar('verifying chunks', 'bytes')
      let result
      try {
        result = await verifyCacheDir(dir, { signal: controller.signal, onProgress: p => bar.update(p.bytes, p.totalBytes) })
      } finally {
        bar.stop()
      }
      if (flags.json === true) console.log(JSON.stringify(result))
      else {
        console.log(`${result.checked} chunks (${mib(result.bytes)}) checked, ${result.bad} bad${result.bad > 0 ? ' and deleted (the agent fetches them again when they are read)' : ''}`)
        for (const hex of result.removed) console.log(`deleted sha256:${hex}`)
      }
      if (result.bad > 0) process.exitCode = 1
    })
}
