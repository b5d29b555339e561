import { execFile, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { access, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { constants } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { promisify } from 'node:util'
import { ShoalError, UsageError } from '../errors.ts'
import type { RuntimeConfig } from '../oci/types.ts'
import { resolveInRoot } from './resolve-in-root.ts'
import { buildRuntimeSpec, containerArgs, resolveUser } from './runtime-spec.ts'

const execFileAsync = promisify(execFile)

export type RuntimeName = 'runc' | 'crun' | 'chroot'

export interface RunOptions {
  /** The read-only image tree (a shoal FUSE mount). */
  lowerDir: string
  runtime: RuntimeConfig
  /** Command and arguments; empty means the image's entrypoint + cmd. */
  args: string[]
  env?: string[]
  /** Which runtime to use; default: runc, else crun, else chroot. */
  use?: RuntimeName
  /** Where the bundle and the overlay's upper dir live (default: the system temp dir). */
  workRoot?: string
  signal?: AbortSignal
}

/**
 * Runs a command in an image, as a container: a writable overlay over the lazy
 * mount, an OCI bundle for runc or crun (chroot when neither is installed). Stdio
 * is passed through; resolves with the command's exit code; everything it set up
 * is removed afterwards, whatever happens.
 */
export async function runContainer (options: RunOptions): Promise<number> {
  const args = containerArgs(options.runtime, options.args)
  if (args.length === 0) throw new UsageError('the image has no entrypoint or cmd: give a command, e.g. shoal run IMAGE -- /bin/sh -c "..."')
  const runtime = options.use ?? await detectRuntime()
  const bundle = await mkdtemp(join(options.workRoot ?? tmpdir(), 'shoal-run-'))
  const rootfs = join(bundle, 'rootfs')
  let overlayMounted = false
  const id = `shoal-${randomBytes(6).toString('hex')}`
  try {
    await Promise.all([mkdir(rootfs), mkdir(join(bundle, 'upper')), mkdir(join(bundle, 'work'))])
    await execFileAsync('mount', ['-t', 'overlay', 'overlay', '-o',
      `lowerdir=${options.lowerDir},upperdir=${join(bundle, 'upper')},workdir=${join(bundle, 'work')}`, rootfs])
    overlayMounted = true
    // Resolved inside the image (an absolute symlink must not reach the host's files), and
    // async only: the FUSE mount below may be served by this very process.
    const [passwd, group] = await Promise.all([readInImage(rootfs, '/etc/passwd'), readInImage(rootfs, '/etc/group')])
    const user = resolveUser(options.runtime.User, passwd, group)
    if (runtime === 'chroot') return await runChroot(rootfs, args, options, user)
    const spec = buildRuntimeSpec({ runtime: options.runtime, args, user, ...(options.env !== undefined ? { env: options.env } : {}) })
    await writeFile(join(bundle, 'config.json'), JSON.stringify(spec, null, 2))
    return await waitForExit(spawn(runtime, ['run', '--bundle', bundle, id], { stdio: 'inherit', ...(options.signal !== undefined ? { signal: options.signal } : {}) }), runtime)
  } finally {
    if (runtime !== 'chroot') await execFileAsync(runtime, ['delete', '--force', id]).catch(() => {})
    if (overlayMounted) await execFileAsync('umount', [rootfs]).catch(async () => { await execFileAsync('umount', ['-l', rootfs]).catch(() => {}) })
    await rm(bundle, { recursive: true, force: true })
  }
}

async function runChroot (rootfs: string, args: string[], options: RunOptions, user: { uid: number, gid: number }): Promise<number> {
  const env = [...(options.runtime.Env ?? []), ...(options.env ?? [])]
  const cwd = options.runtime.WorkingDir !== undefined && options.runtime.WorkingDir !== '' ? options.runtime.WorkingDir : '/'
  // chroot(8) cannot change directory inside the new root, so a shell does it.
  const child = spawn('chroot', ['--userspec', `${user.uid}:${user.gid}`, rootfs, '/usr/bin/env', '-i', ...env, '/bin/sh', '-c', 'cd "$0" && exec "$@"', cwd, ...args],
    { stdio: 'inherit', ...(options.signal !== undefined ? { signal: options.signal } : {}) })
  return await waitForExit(child, 'chroot')
}

function waitForExit (child: ReturnType<typeof spawn>, what: string): Promise<number> {
  return new Promise((resolve, reject) => {
    child.once('error', err => reject(new ShoalError('ERUNTIME', `cannot start ${what}: ${err.message}`, { cause: err })))
    child.once('exit', (code, signal) => resolve(code ?? (signal !== null ? 128 + (osSignals[signal] ?? 1) : 1)))
  })
}

const osSignals: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15 }

async function readInImage (rootfs: string, path: string): Promise<string> {
  return await resolveInRoot(rootfs, path).then(p => readFile(join(rootfs, p), 'utf8'), () => '')
}

/** runc first (crun 1.8 refuses hybrid cgroup hosts), then crun, then chroot. */
export async function detectRuntime (): Promise<RuntimeName> {
  for (const name of ['runc', 'crun'] as const) {
    if (await onPath(name)) return name
  }
  return 'chroot'
}

async function onPath (name: string): Promise<boolean> {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir !== '' && await access(join(dir, name), constants.X_OK).then(() => true, () => false)) return true
  }
  return false
}
