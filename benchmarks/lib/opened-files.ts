/**
 * Which files a command opens, and their total size: the command runs chrooted in
 * an unpacked image tree under `strace -f`, every successful open/openat/execve
 * after the chroot(2) is resolved inside that tree (symlinks followed within it,
 * never on the host), and the sizes of the distinct regular files are summed. The
 * ELF interpreter of every executed binary counts too: the kernel opens it without
 * an openat the trace would show.
 */
import { open, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from './proc.ts'
import { resolveInRoot } from '../../src/run/resolve-in-root.ts'

export interface OpenedFiles {
  /** Distinct regular files (by device and inode), largest first. */
  files: Array<{ path: string, size: number }>
  bytes: number
  /** Successful opens whose path could not be resolved (relative to a directory fd, or gone). */
  unresolved: string[]
  stdout: string
}

const IMAGE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

export async function openedFiles (rootfs: string, command: string[], traceFile: string): Promise<OpenedFiles> {
  const result = await run('strace', ['-f', '-qq', '-o', traceFile, '-e', 'trace=open,openat,execve,chroot,chdir',
    'env', '-i', `PATH=${IMAGE_PATH}`, 'HOME=/root', 'chroot', rootfs, ...command], { timeoutMs: 120_000 })
  const events = parseTrace(await readFile(traceFile, 'utf8'))
  const seen = new Map<string, { path: string, size: number }>()
  const unresolved: string[] = []
  let inRoot = false
  let cwd = '/'
  const add = async (path: string): Promise<string | undefined> => {
    const abs = path.startsWith('/') ? path : join(cwd, path)
    const inside = await resolveInRoot(rootfs, abs).catch(() => undefined)
    const host = inside === undefined ? undefined : join(rootfs, inside)
    if (host === undefined) { unresolved.push(path); return undefined }
    const st = await stat(host).catch(() => undefined)
    if (st === undefined) { unresolved.push(path); return undefined }
    if (st.isFile()) seen.set(`${st.dev}:${st.ino}`, { path: abs, size: st.size })
    return host
  }
  for (const e of events) {
    if (e.ret < 0) continue
    if (e.call === 'chroot') { inRoot = true; cwd = '/'; continue }
    if (!inRoot) continue
    if (e.call === 'chdir') { cwd = e.path.startsWith('/') ? e.path : join(cwd, e.path); continue }
    if (e.call === 'openat' && !e.atCwd && !e.path.startsWith('/')) { unresolved.push(e.path); continue }
    const host = await add(e.path)
    if (e.call === 'execve' && host !== undefined) {
      const interp = await elfInterpreter(host)
      if (interp !== undefined) await add(interp)
    }
  }
  const files = [...seen.values()].sort((a, b) => b.size - a.size)
  return { files, bytes: files.reduce((n, f) => n + f.size, 0), unresolved, stdout: result.stdout }
}

interface TraceEvent { call: string, path: string, atCwd: boolean, ret: number }

/** open/openat/execve/chroot/chdir events of an `strace -f -o` file, with unfinished/resumed halves joined. */
export function parseTrace (text: string): TraceEvent[] {
  const pending = new Map<string, string>()
  const events: TraceEvent[] = []
  for (const raw of text.split('\n')) {
    const m = /^(\d+)\s+(.*)$/.exec(raw)
    if (m === null) continue
    const [, pid, rest] = m as unknown as [string, string, string]
    let line = rest
    if (line.endsWith('<unfinished ...>')) { pending.set(pid, line.slice(0, -'<unfinished ...>'.length)); continue }
    const resumed = /^<\.\.\. \w+ resumed>(.*)$/.exec(line)
    if (resumed !== null) { line = (pending.get(pid) ?? '') + resumed[1]!; pending.delete(pid) }
    const call = /^(open|openat|execve|chroot|chdir)\((.*)\)\s+=\s+(-?\d+)/.exec(line)
    if (call === null) continue
    const [, name, args, ret] = call as unknown as [string, string, string, string]
    const atCwd = name !== 'openat' || args.startsWith('AT_FDCWD')
    const str = /"((?:[^"\\]|\\.)*)"/.exec(args)
    if (str === null) continue
    events.push({ call: name, path: unescape(str[1]!), atCwd, ret: Number(ret) })
  }
  return events
}

function unescape (s: string): string {
  const bytes: number[] = []
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!
    if (c !== '\\') { bytes.push(...Buffer.from(c)); continue }
    const n = s[++i]!
    if (n === 'x') { bytes.push(parseInt(s.slice(i + 1, i + 3), 16)); i += 2 } else if (/[0-7]/.test(n)) {
      const oct = /^[0-7]{1,3}/.exec(s.slice(i))![0]
      bytes.push(parseInt(oct, 8)); i += oct.length - 1
    } else bytes.push(({ n: 10, t: 9, r: 13, v: 11, f: 12 } as Record<string, number>)[n] ?? n.charCodeAt(0))
  }
  return Buffer.from(bytes).toString('utf8')
}

/** PT_INTERP of a 64-bit ELF file, e.g. /lib64/ld-linux-x86-64.so.2; undefined for anything else. */
async function elfInterpreter (file: string): Promise<string | undefined> {
  const fh = await open(file, 'r').catch(() => undefined)
  if (fh === undefined) return undefined
  try {
    const head = Buffer.alloc(4096)
    const { bytesRead } = await fh.read(head, 0, head.length, 0)
    if (bytesRead < 64 || head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2) return undefined
    const phoff = Number(head.readBigUInt64LE(0x20))
    const phentsize = head.readUInt16LE(0x36)
    const phnum = head.readUInt16LE(0x38)
    for (let i = 0; i < phnum; i++) {
      const off = phoff + i * phentsize
      if (off + 40 > bytesRead) return undefined
      if (head.readUInt32LE(off) !== 3) continue
      const at = Number(head.readBigUInt64LE(off + 8))
      const size = Number(head.readBigUInt64LE(off + 32))
      const name = Buffer.alloc(Math.min(size, 4096))
      await fh.read(name, 0, name.length, at)
      return name.toString('utf8').replace(/\0.*$/s, '')
    }
    return undefined
  } finally {
    await fh.close()
  }
}
