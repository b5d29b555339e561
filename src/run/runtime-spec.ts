import { FormatError } from '../errors.ts'
import type { RuntimeConfig } from '../oci/types.ts'

/** The parts of an OCI runtime spec (runtime-spec config.md) that shoal writes. */
export interface RuntimeSpec {
  ociVersion: string
  process: {
    terminal: boolean
    user: { uid: number, gid: number, additionalGids?: number[] }
    args: string[]
    env: string[]
    cwd: string
    capabilities: Record<'bounding' | 'effective' | 'permitted', string[]>
    noNewPrivileges: boolean
  }
  root: { path: string, readonly: boolean }
  hostname: string
  mounts: Array<{ destination: string, type: string, source: string, options?: string[] }>
  linux: { namespaces: Array<{ type: string }>, maskedPaths: string[], readonlyPaths: string[] }
}

const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

/** Docker's default capability set: what images expect to have. */
const CAPABILITIES = ['CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID', 'CAP_SETUID',
  'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE']

/** The command a container runs: ARGS if given, else the image's entrypoint + cmd, as `docker run` does. */
export function containerArgs (runtime: RuntimeConfig, args: string[]): string[] {
  const entrypoint = runtime.Entrypoint ?? []
  const command = args.length > 0 ? args : runtime.Cmd ?? []
  return [...entrypoint, ...command]
}

/**
 * A runtime spec for one container: the image's env, working dir and user, a fresh
 * PID/IPC/UTS/mount namespace, the host's network (agents run on cluster nodes whose
 * network the container shares, as with `--net=host`), and the usual masked paths.
 */
export function buildRuntimeSpec (options: { runtime: RuntimeConfig, args: string[], user: { uid: number, gid: number, additionalGids?: number[] }, env?: string[], terminal?: boolean, hostname?: string }): RuntimeSpec {
  const env = options.runtime.Env ?? []
  const merged = env.some(e => e.startsWith('PATH=')) ? [...env] : [DEFAULT_PATH, ...env]
  for (const extra of options.env ?? []) {
    const name = extra.split('=')[0]
    const i = merged.findIndex(e => e.split('=')[0] === name)
    if (i >= 0) merged[i] = extra
    else merged.push(extra)
  }
  return {
    ociVersion: '1.0.2',
    process: {
      terminal: options.terminal ?? false,
      user: options.user,
      args: options.args,
      env: merged,
      cwd: options.runtime.WorkingDir !== undefined && options.runtime.WorkingDir !== '' ? options.runtime.WorkingDir : '/',
      capabilities: { bounding: CAPABILITIES, effective: CAPABILITIES, permitted: CAPABILITIES },
      noNewPrivileges: false
    },
    root: { path: 'rootfs', readonly: false },
    hostname: options.hostname ?? 'shoal',
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/sys', type: 'none', source: '/sys', options: ['rbind', 'nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=1777'] },
      { destination: '/etc/resolv.conf', type: 'none', source: '/etc/resolv.conf', options: ['rbind', 'ro'] }
    ],
    linux: {
      namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }],
      maskedPaths: ['/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list', '/proc/timer_stats', '/proc/sched_debug', '/sys/firmware', '/proc/scsi'],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger']
    }
  }
}

/**
 * Resolves the image's USER ("name", "uid", "name:group", "uid:gid") against the
 * image's own /etc/passwd and /etc/group text, as container engines do.
 */
export function resolveUser (user: string | undefined, passwd: string, group: string): { uid: number, gid: number } {
  if (user === undefined || user === '') return { uid: 0, gid: 0 }
  const [u, g] = user.split(':') as [string, string | undefined]
  const passwdRows = passwd.split('\n').map(l => l.split(':'))
  let uid: number
  let gid: number | undefined
  if (/^\d+$/.test(u)) {
    uid = Number(u)
    const row = passwdRows.find(r => r[2] === u)
    if (row !== undefined) gid = Number(row[3])
  } else {
    const row = passwdRows.find(r => r[0] === u)
    if (row === undefined) throw new FormatError(`image user "${u}" is not in the image's /etc/passwd`)
    uid = Number(row[2])
    gid = Number(row[3])
  }
  if (g !== undefined && g !== '') {
    if (/^\d+$/.test(g)) gid = Number(g)
    else {
      const row = group.split('\n').map(l => l.split(':')).find(r => r[0] === g)
      if (row === undefined) throw new FormatError(`image group "${g}" is not in the image's /etc/group`)
      gid = Number(row[2])
    }
  }
  return { uid, gid: gid ?? 0 }
}
