import type { Command } from 'commander'
import { DEFAULT_SIGNATURE_LIFETIME } from '../../format/signing-defaults.ts'
import type { RuntimeName } from '../../run/run-container.ts'

export interface TraceFlags { key: string, tag?: string, runtime?: RuntimeName, expires?: string }

/**
 * `shoal trace`: run a command in an image, record what it reads, and write that as
 * the image's prefetch list in a new signed version of the image. Agents fetch the
 * list in the background right after mounting, so the next start finds it cached.
 */
export function registerTraceCommand (program: Command): void {
  program.command('trace')
    .description('record which files and ranges a command reads; write them as the image\'s prefetch list (a new signed version)')
    .argument('<image>', 'oci:DIR:TAG (a shoal image in a local layout)')
    .argument('[command...]', 'command and arguments (default: the image\'s entrypoint and cmd)')
    .requiredOption('--key <file>', 'signing key for the new version (shoal.key)')
    .option('--tag <tag>', 'tag for the new version (default: the same tag, replaced)')
    .option('--runtime <name>', 'runc, crun or chroot (default: the first one installed)')
    .option('--expires <duration>', `lifetime of the new version's signature: 90d, 12h, 2w, ... or never (default ${DEFAULT_SIGNATURE_LIFETIME})`)
    .action(async (image: string, command: string[], flags: TraceFlags) => { await (await import('./trace-action.ts')).traceAction(image, command, flags) })
}
