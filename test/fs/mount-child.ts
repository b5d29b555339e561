/**
 * Child process for the stale-mount test: mounts a converted image and waits to
 * be killed, like an agent that dies without unmounting.
 * Arguments: WORKDIR LAYOUT_DIR TAG MOUNTPOINT.
 */
import { mountImage } from '../../src/fs/mount.ts'
import { openReadStack } from './helpers.ts'

const [workdir, layoutDir, tag, mountpoint] = process.argv.slice(2) as [string, string, string, string]
const stack = await openReadStack(workdir, { layoutDir, tag })
await mountImage({ mountpoint, view: stack.view, resolver: stack.resolver })
process.stdout.write('mounted\n')
setInterval(() => {}, 60_000)
