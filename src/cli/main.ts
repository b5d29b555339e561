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

try {
  await program.parseAsync(process.argv)
} catch (err) {
  if (err instanceof CommanderError) process.exit(err.exitCode)
  if (err instanceof ShoalError) {
    console.error(`shoal: ${err.message}`)
    process.exit(err.code === 'EUSAGE' ? 2 : 1)
  }
  throw err
}
