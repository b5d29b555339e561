/**
 * The two filesystems compared: a shoal agent (a `bin/shoal agent` child process,
 * mounts through `bin/shoal mount`) and squashfuse over a mksquashfs image.
 */
import { mkdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import type { AgentStats, MountInfo } from '../../src/agent/agent.ts'
import { callAgent, controlSocketPath } from '../../src/agent/control.ts'
import { firstLine, isMounted, run, startDaemon, stopChild, unmountAllBelow, waitFor, type Cleanup, type Daemon } from './proc.ts'

export const SHOAL = resolve(import.meta.dirname, '..', '..', 'bin', 'shoal')

export interface ShoalAgent {
  state: string
  daemon: Daemon
  mount (image: string, mountpoint: string): Promise<void>
  umount (mountpoint: string): Promise<void>
  mounts (): Promise<MountInfo[]>
  stats (): Promise<AgentStats>
  /** SIGTERM (the agent unmounts what it mounted), then any leftover mount below the mount points it had is removed. */
  stop (): Promise<void>
}

/** Starts `bin/shoal agent` (no p2p, no metrics) and waits for its ready line. */
export async function startAgent (cleanup: Cleanup, options: { state: string, origin: string, trust: string, name?: string }): Promise<ShoalAgent> {
  const name = options.name ?? 'agent'
  const daemon = startDaemon(name, SHOAL, ['agent', '--state', options.state, '--origin', options.origin, '--trust', options.trust,
    '--metrics', 'off', '--no-p2p', '--log-level', 'warn'])
  const mountpoints = new Set<string>()
  const stop = async (): Promise<void> => {
    await daemon.stop()
    for (const m of mountpoints) await unmountAllBelow(m)
  }
  const release = cleanup.add(`stop ${name}`, stop)
  try {
    await firstLine(daemon.child, name)
  } catch (err) {
    await release()
    throw err
  }
  const socket = controlSocketPath(options.state)
  return {
    state: options.state,
    daemon,
    async mount (image, mountpoint) {
      await mkdir(mountpoint, { recursive: true })
      mountpoints.add(mountpoint)
      await run(SHOAL, ['mount', image, mountpoint, '--state', options.state], { timeoutMs: 180_000 })
    },
    async umount (mountpoint) {
      await run(SHOAL, ['umount', mountpoint, '--state', options.state], { timeoutMs: 60_000 })
      mountpoints.delete(mountpoint)
    },
    mounts: async () => await callAgent<MountInfo[]>(socket, 'GET', '/v1/mounts'),
    stats: async () => await callAgent<AgentStats>(socket, 'GET', '/v1/stats'),
    stop: release
  }
}

/** FUSE read calls that reached the agent for MOUNTPOINT so far. */
export async function fuseReads (agent: ShoalAgent, mountpoint: string): Promise<number> {
  const m = (await agent.mounts()).find(x => x.mountpoint === resolve(mountpoint))
  if (m === undefined) throw new Error(`${mountpoint} is not mounted by the agent at ${agent.state}`)
  return m.fs.reads
}

/** mksquashfs SRC into OUT with zstd level 3 (the codec and level of shoal's chunks). */
export async function makeSquashfs (src: string, out: string): Promise<number> {
  const r = await run('mksquashfs', [src, out, '-noappend', '-comp', 'zstd', '-Xcompression-level', '3', '-quiet', '-no-progress'], { timeoutMs: 1_800_000 })
  return r.seconds
}

export interface Squashfuse { mountpoint: string, stop: () => Promise<void>, /** The squashfuse process (its CPU time: /proc/PID/stat). */ pid: number }

/** squashfuse (libfuse3, its default multi-threaded loop, default options) in the foreground as our child; stop() unmounts it. */
export async function mountSquashfuse (cleanup: Cleanup, image: string, mountpoint: string, name = 'squashfuse'): Promise<Squashfuse> {
  await mkdir(mountpoint, { recursive: true })
  const daemon = startDaemon(name, 'squashfuse', ['-f', image, mountpoint])
  const stop = async (): Promise<void> => {
    // As root libfuse3 mounts with mount(2) itself; fusermount3 (package fuse3) conflicts with fuse-native's fuse, so plain umount.
    if (await isMounted(mountpoint)) await run('umount', [mountpoint], { check: false, timeoutMs: 30_000 })
    await stopChild(daemon.child, 10_000)
    await unmountAllBelow(mountpoint)
  }
  const release = cleanup.add(`stop ${name}`, stop)
  try {
    await waitFor(`squashfuse mounted at ${mountpoint}`, async () => {
      if (daemon.child.exitCode !== null) throw new Error(`squashfuse exited with ${daemon.child.exitCode}`)
      return await isMounted(mountpoint)
    }, 30_000)
  } catch (err) {
    await release()
    throw err
  }
  return { mountpoint, stop: release, pid: daemon.child.pid! }
}

export const mnt = (work: string, name: string): string => join(work, 'mnt', name)
