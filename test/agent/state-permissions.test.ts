import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { chmod, lstat, mkdir, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { it } from 'node:test'
import { startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import { callAgent } from '../../src/agent/control.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { runTool } from '../helpers/exec.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * Issue 15 item 5: any local user could read image contents from the agent's state
 * directory (chunks 0644 in 0755 directories), although FUSE refuses them the same
 * file. After an agent has run (mounted, read, cached, with peers and the
 * snapshotter on), user nobody must be able to open nothing under the state dir,
 * also when that dir was made by an older agent with the old modes.
 */

const NOBODY = 65534
const SECRET = 'root:$y$j9T$secret-hash:19000:0:99999:7:::\n'

interface Entry { path: string, mode: number, kind: 'dir' | 'file' | 'socket' | 'other' }

/** Every entry under DIR (DIR included), not following symlinks. */
async function walk (dir: string): Promise<Entry[]> {
  const out: Entry[] = []
  const visit = async (path: string): Promise<void> => {
    const st = await lstat(path)
    const kind = st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isSocket() ? 'socket' : 'other'
    out.push({ path, mode: st.mode & 0o7777, kind })
    if (kind === 'dir') for (const name of await readdir(path)) await visit(join(path, name))
  }
  await visit(dir)
  return out
}

/** The paths user nobody can open (files) or list (directories), tried by one process running as nobody. */
async function openableByNobody (entries: Entry[]): Promise<string[]> {
  const script = `
    const fs = require('node:fs')
    const entries = JSON.parse(fs.readFileSync(0, 'utf8'))
    const ok = []
    for (const e of entries) {
      try { if (e.kind === 'dir') fs.readdirSync(e.path); else fs.closeSync(fs.openSync(e.path, 'r')); ok.push(e.path) } catch {}
    }
    process.stdout.write(JSON.stringify(ok))`
  return await new Promise((resolve, reject) => {
    const child = execFile(process.execPath, ['-e', script], { uid: NOBODY, gid: NOBODY, timeout: 30_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout) => {
      if (err !== null) reject(err)
      else resolve(JSON.parse(stdout) as string[])
    })
    child.stdin!.end(JSON.stringify(entries.filter(e => e.kind !== 'socket')))
  })
}

const loose = (entries: Entry[]): string[] => entries.filter(e => e.kind !== 'socket' && (e.mode & 0o077) !== 0).map(e => `${e.path} ${e.mode.toString(8)}`)

it('nothing under the state dir is readable by other users after a run, even when an older agent made it', { timeout: 120_000 }, async () => {
  const dir = await tempDir('shoal-perm-')
  // mkdtemp makes 0700 dirs, which would hide everything below by themselves: open up the
  // path to the state dir as /var/lib is, so the state dir's own modes are what is tested.
  await chmod(dir, 0o755)
  const keys = generateKeyPairSync('ed25519')
  const src = await buildSyntheticImage(join(dir, 'src'), 't', [[
    { type: 'dir', path: 'etc' },
    { type: 'file', path: 'etc/shadow', content: SECRET, mode: 0o640 },
    { type: 'file', path: 'etc/motd', content: 'hello\n' }
  ]])
  await convertImage({ source: src.ref, dest: `oci:${join(dir, 'images')}:t`, signingKey: keys.privateKey })
  const pub = join(dir, 'shoal.pub')
  await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))

  // What an older agent left: everything with the default umask's modes.
  const state = join(dir, 'state')
  const oldChunk = join(state, 'cache', 'chunks', 'ab', 'ab'.padEnd(64, '0'))
  await mkdir(join(state, 'cache', 'chunks', 'ab'), { recursive: true, mode: 0o755 })
  await mkdir(join(state, 'catalogs'), { mode: 0o755 })
  for (const d of [state, join(state, 'cache'), join(state, 'cache', 'chunks'), join(state, 'cache', 'chunks', 'ab'), join(state, 'catalogs')]) await chmod(d, 0o755)
  await writeFile(oldChunk, SECRET, { mode: 0o644 })
  await writeFile(join(state, 'mounts.json'), '[]', { mode: 0o644 })

  let agent: AgentProcess | undefined
  const mnt = join(dir, 'mnt')
  try {
    agent = await startAgentProcess(state, [
      '--origin', join(dir, 'images'), '--trust', pub, '--metrics', 'off', '--log-level', 'warn',
      '--listen', '/ip4/127.0.0.1/tcp/0', '--snapshotter-socket', join(dir, 'run', 'snapshotter.sock')
    ], { stderr: 'ignore' })
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    assert.equal((await runTool('cat', [join(mnt, 'etc', 'shadow')])).stdout, SECRET, 'root reads it through FUSE')
    await runTool('cat', [join(mnt, 'etc', 'motd')])

    const entries = await walk(state)
    const names = entries.map(e => e.path.slice(state.length))
    process.stderr.write(`state dir after a run: ${entries.length} entries: ${names.filter(n => !/^\/cache\/chunks\/..\/./.test(n) && !/^\/cache\/chunks\/../.test(n)).join(' ')} (+ 256 chunk prefix dirs and their chunks)\n`)
    for (const expected of ['/cache/chunks', '/cache/tmp', '/catalogs', '/mounts.json', '/peer.key', '/snapshotter', '/agent.sock']) {
      assert.ok(names.includes(expected), `${expected} exists under the state dir`)
    }
    const readable = await openableByNobody(entries)
    process.stderr.write(`nobody can open ${readable.length} of ${entries.length} entries; ${loose(entries).length} have group/other bits: ${loose(entries).slice(0, 8).map(e => e.slice(state.length)).join(', ')}\n`)
    assert.deepEqual(readable, [], 'user nobody opens nothing under the state dir')
    assert.equal(entries[0]!.mode, 0o700, 'the state dir is 0700')
    // Defence in depth: what shoal itself creates is root-only too, whatever the dir above. Every
    // file and directory, the ones written since start (catalogs, mounts.json) included: they
    // were 0644 until the next start tightened them.
    assert.deepEqual(loose(entries).map(e => e.slice(state.length)), [], 'every dir 0700 and every file 0600 under the state dir')
  } finally {
    await agent?.stop()
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})
