#!/usr/bin/env node
import { Command, CommanderError } from 'commander'
import { resolve } from 'node:path'
import { ShoalError } from '../errors.ts'
import { errorOrigin, oneLine } from '../util/error-line.ts'

/**
 * The command groups: the top-level commands each module defines, and how to load its
 * registration. Only the group of the command being run is imported (all of them for
 * `shoal`, `shoal --help` or `shoal help`), and each registration imports only what its
 * definitions need, the actions importing the rest when they run: a command does not pay
 * for the modules of the others (libp2p, SQLite, the converter), so `shoal stats` starts
 * in about Node's own start-up time (docs/BENCHMARKS.md, "CLI start"). A new command
 * module adds a line here.
 */
const COMMAND_GROUPS: Array<{ names: string[], register: () => Promise<(program: Command) => void> }> = [
  { names: ['keygen', 'convert', 'push', 'sign', 'verify', 'inspect'], register: async () => (await import('./commands/image.ts')).registerImageCommands },
  { names: ['origin'], register: async () => (await import('./commands/origin.ts')).registerOriginCommands },
  { names: ['agent', 'mount', 'umount', 'ls', 'stats', 'run'], register: async () => (await import('./commands/agent.ts')).registerAgentCommands },
  { names: ['trace'], register: async () => (await import('./commands/trace.ts')).registerTraceCommand },
  { names: ['convertd'], register: async () => (await import('./commands/convertd.ts')).registerConvertdCommands },
  { names: ['cache'], register: async () => (await import('./commands/cache.ts')).registerCacheCommands }
]

const program = new Command('shoal')
  .description('peer-to-peer, on-demand chunk distribution for container images')
  .version('0.1.0')
  .showHelpAfterError()
  .exitOverride()

/**
 * Every error ends the command with one line on stderr: what happened and what to do.
 * Errors shoal expects are ShoalErrors, whose messages say both; anything else (a
 * bug, or a system error no command anticipated) gets its message, where it came
 * from, and how to see the whole trace (SHOAL_DEBUG=1).
 */
/** The installation's root: error origins are given relative to it (`src/...`). */
const SHOAL_ROOT = resolve(import.meta.dirname, '../..')

function fail (err: unknown): never {
  if (err instanceof CommanderError) process.exit(err.exitCode)
  if (err instanceof ShoalError) {
    console.error(`shoal: ${oneLine(err.message)}`)
    if (process.env.SHOAL_DEBUG === '1' && err.stack !== undefined) console.error(err.stack)
    process.exit(err.code === 'EUSAGE' ? 2 : 1)
  }
  const e = err instanceof Error ? err : new Error(String(err))
  const system = e as NodeJS.ErrnoException
  if (system.syscall !== undefined) {
    // A system call failed on something a command was given or uses (a path, a socket).
    console.error(`shoal: ${oneLine(e.message)}; check the path, that it exists and its permissions (SHOAL_DEBUG=1 shows where it failed)`)
  } else {
    const at = errorOrigin(e.stack, SHOAL_ROOT)
    console.error(`shoal: ${oneLine(e.message)}${system.code !== undefined ? ` (${system.code})` : ''}; this is a bug in shoal${at !== undefined ? ` (at ${at})` : ''}: rerun with SHOAL_DEBUG=1 for the whole trace and report it`)
  }
  if (process.env.SHOAL_DEBUG === '1' && e.stack !== undefined) console.error(e.stack)
  process.exit(1)
}

// An error thrown outside the command's promise chain (an 'error' event nobody
// listened to) would otherwise print Node's multi-line report.
process.on('uncaughtException', fail)
process.on('unhandledRejection', fail)

try {
  const name = process.argv[2]
  const group = COMMAND_GROUPS.find(g => name !== undefined && g.names.includes(name))
  // An unknown command, help or no command at all: every group, so help and errors list them all.
  for (const g of group !== undefined ? [group] : COMMAND_GROUPS) (await g.register())(program)
  await program.parseAsync(process.argv)
} catch (err) {
  fail(err)
}
