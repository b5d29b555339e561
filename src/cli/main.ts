#!/usr/bin/env node
import { Command, CommanderError } from 'commander'
import { ShoalError } from '../errors.ts'
import { registerAgentCommands } from './commands/agent.ts'
import { registerDemoCommand } from './commands/demo.ts'
import { registerImageCommands } from './commands/image.ts'
import { registerOriginCommands } from './commands/origin.ts'
import { registerTraceCommand } from './commands/trace.ts'

const program = new Command('shoal')
  .description('peer-to-peer, on-demand chunk distribution for container images')
  .version('0.1.0')
  .showHelpAfterError()
  .exitOverride()

registerImageCommands(program)
registerOriginCommands(program)
registerAgentCommands(program)
registerDemoCommand(program)
registerTraceCommand(program)

/**
 * Every error ends the command with one line on stderr: what happened and what to do.
 * Errors shoal expects are ShoalErrors, whose messages say both; anything else (a
 * bug, or a system error no command anticipated) gets its message, where it came
 * from, and how to see the whole trace (SHOAL_DEBUG=1).
 */
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
    const at = origin(e.stack)
    console.error(`shoal: ${oneLine(e.message)}${system.code !== undefined ? ` (${system.code})` : ''}; this is a bug in shoal${at !== undefined ? ` (at ${at})` : ''}: rerun with SHOAL_DEBUG=1 for the whole trace and report it`)
  }
  if (process.env.SHOAL_DEBUG === '1' && e.stack !== undefined) console.error(e.stack)
  process.exit(1)
}

/** Where an error came from: the first stack frame in shoal's own sources, else the first one. */
function origin (stack: string | undefined): string | undefined {
  const frames = [...(stack ?? '').matchAll(/\n\s+at (?:.*?\()?(?:file:\/\/)?([^()\n]+?:\d+):\d+\)?/g)].map(m => m[1]!)
  const ours = frames.find(f => f.includes('/src/'))
  return (ours ?? frames[0])?.replace(/^.*\/(src\/)/, '$1')
}

function oneLine (text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim()
}

// An error thrown outside the command's promise chain (an 'error' event nobody
// listened to) would otherwise print Node's multi-line report.
process.on('uncaughtException', fail)
process.on('unhandledRejection', fail)

try {
  await program.parseAsync(process.argv)
} catch (err) {
  fail(err)
}
