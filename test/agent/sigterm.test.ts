import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { mkdir, open, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { it } from 'node:test'
import { startAgentProcess, type AgentProcess } from '../../src/agent/agent-process.ts'
import { callAgent } from '../../src/agent/control.ts'
import { AGENT_SHUTDOWN_DEFAULTS } from '../../src/cli/commands/agent.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { isFuseMount } from '../../src/fs/stale-mount.ts'
import { runTool } from '../helpers/exec.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * Issue 15: an agent must exit soon after SIGTERM in every state, whatever
 * fusermount says about its mounts. Each test starts a real `shoal agent`
 * process (no p2p, origin = a layout directory) and kills it with -9 in `finally`
 * if it is still there.
 */

/** Generous for a clean stop (the agent unmounts and closes its cache); the bug was "never". */
const EXIT_WITHIN_MS = 8_000

async function setUp (options: { fusermount?: string } = {}): Promise<{ dir: string, agent: AgentProcess, log: () => string }> {
  const dir = await tempDir('shoal-sigterm-')
  const keys = generateKeyPairSync('ed25519')
  const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'file', path: 'hello', content: 'world\n' }]])
  await convertImage({ source: src.ref, dest: `oci:${join(dir, 'images')}:t`, signingKey: keys.privateKey })
  const pub = join(dir, 'shoal.pub')
  await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
  // A fake fusermount first on the agent's PATH (mounting as root does not use it; unmounting does).
  let env: NodeJS.ProcessEnv | undefined
  if (options.fusermount !== undefined) {
    await mkdir(join(dir, 'bin'))
    await writeFile(join(dir, 'bin', 'fusermount'), `#!/bin/sh\n${options.fusermount}\n`, { mode: 0o755 })
    env = { ...process.env, PATH: `${join(dir, 'bin')}:${process.env.PATH ?? ''}` }
  }
  const agent = await startAgentProcess(join(dir, 'state'), ['--origin', join(dir, 'images'), '--trust', pub, '--no-p2p', '--metrics', 'off', '--log-level', 'warn'], { stderr: 'pipe', ...(env !== undefined ? { env } : {}) })
  let log = ''
  agent.child.stderr!.on('data', (c: Buffer) => { log += c.toString() })
  return { dir, agent, log: () => log }
}

/** SIGTERM, then how long until the process is gone (undefined: still there after EXIT_WITHIN_MS, then killed). */
async function terminate (agent: AgentProcess): Promise<number | undefined> {
  const started = performance.now()
  const exited = new Promise<number>(resolve => agent.child.once('exit', () => resolve(performance.now() - started)))
  agent.child.kill('SIGTERM')
  const ms = await Promise.race([exited, new Promise<undefined>(resolve => setTimeout(() => resolve(undefined), EXIT_WITHIN_MS).unref())])
  return ms
}

async function kill (agent: AgentProcess): Promise<void> {
  if (agent.child.exitCode !== null || agent.child.signalCode !== null) return
  const gone = new Promise(resolve => agent.child.once('exit', resolve))
  agent.child.kill('SIGKILL')
  await gone
}

it('exits after SIGTERM when a mount was unmounted by someone else (fusermount -u)', { timeout: 60_000 }, async () => {
  const { dir, agent } = await setUp()
  const mnt = join(dir, 'mnt')
  try {
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    assert.ok(await isFuseMount(mnt))
    await runTool('fusermount', ['-u', mnt], { timeoutMs: 10_000 })
    assert.equal(await isFuseMount(mnt), false)
    const ms = await terminate(agent)
    process.stderr.write(`exited ${ms === undefined ? 'never' : `after ${Math.round(ms)} ms`} (mount unmounted by someone else)\n`)
    assert.ok(ms !== undefined, `the agent was still running ${EXIT_WITHIN_MS} ms after SIGTERM`)
    assert.equal(agent.child.exitCode, 0, 'a clean exit')
  } finally {
    await kill(agent)
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})

it('exits after SIGTERM with a live mount that a process holds a file open in, and leaves no mount', { timeout: 60_000 }, async () => {
  const { dir, agent } = await setUp()
  const mnt = join(dir, 'mnt')
  let held: Awaited<ReturnType<typeof open>> | undefined
  try {
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    // This process does not serve the mount (the agent does), so it may open files in it.
    held = await open(join(mnt, 'hello'), 'r')
    const ms = await terminate(agent)
    process.stderr.write(`exited ${ms === undefined ? 'never' : `after ${Math.round(ms)} ms`} (live mount, file held open)\n`)
    assert.ok(ms !== undefined, `the agent was still running ${EXIT_WITHIN_MS} ms after SIGTERM`)
    assert.equal(await isFuseMount(mnt), false)
  } finally {
    await held?.close().catch(() => {})
    await kill(agent)
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})

it('exits after SIGTERM with no mounts', { timeout: 60_000 }, async () => {
  const { agent } = await setUp()
  try {
    const ms = await terminate(agent)
    assert.ok(ms !== undefined, `the agent was still running ${EXIT_WITHIN_MS} ms after SIGTERM`)
    assert.equal(agent.child.exitCode, 0)
  } finally {
    await kill(agent)
  }
})

it('exits after SIGTERM when fusermount fails and the mount stays (exit 0, the error logged)', { timeout: 60_000 }, async () => {
  const { dir, agent, log } = await setUp({ fusermount: 'echo "fusermount: failed to unmount $2: Device or resource busy" >&2; exit 1' })
  const mnt = join(dir, 'mnt')
  try {
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    const ms = await terminate(agent)
    process.stderr.write(`exited ${ms === undefined ? 'never' : `after ${Math.round(ms)} ms`} (fusermount fails)\n`)
    assert.ok(ms !== undefined, `the agent was still running ${EXIT_WITHIN_MS} ms after SIGTERM`)
    assert.match(log(), /Device or resource busy.*"msg":"unmount failed"/)
  } finally {
    await kill(agent)
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})

it('exits after SIGTERM within the grace period when fusermount hangs (exit 1, says why)', { timeout: 60_000 }, async () => {
  // `read` waits on the agent's pipe, so the fake ends when the agent does: nothing outlives the test.
  const { dir, agent, log } = await setUp({ fusermount: 'read line; exit 1' })
  const mnt = join(dir, 'mnt')
  try {
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    const ms = await terminate(agent)
    process.stderr.write(`exited ${ms === undefined ? 'never' : `after ${Math.round(ms)} ms`} (fusermount hangs)\n`)
    assert.ok(ms !== undefined, `the agent was still running ${EXIT_WITHIN_MS} ms after SIGTERM`)
    assert.ok(ms >= AGENT_SHUTDOWN_DEFAULTS.graceMs - 100, `exited after ${ms} ms, before the grace period`)
    assert.equal(agent.child.exitCode, 1)
    assert.match(log(), /did not stop within 5000 ms.*cleaned up by the next start/)
  } finally {
    await kill(agent)
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})

it('shoal umount of a mount someone else unmounted succeeds, and the agent forgets it', { timeout: 60_000 }, async () => {
  const { dir, agent, log } = await setUp()
  const mnt = join(dir, 'mnt')
  try {
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    await runTool('fusermount', ['-u', mnt], { timeoutMs: 10_000 })
    await callAgent(agent.socket, 'DELETE', '/v1/mounts', { mountpoint: mnt })
    assert.deepEqual(await callAgent(agent.socket, 'GET', '/v1/mounts'), [])
    assert.match(log(), /already been unmounted by someone else/)
    // The same path can be mounted again.
    await callAgent(agent.socket, 'POST', '/v1/mounts', { image: 't', mountpoint: mnt })
    assert.ok(await isFuseMount(mnt))
  } finally {
    await kill(agent)
    await runTool('fusermount', ['-uz', mnt], { timeoutMs: 10_000 }).catch(() => {})
  }
})
