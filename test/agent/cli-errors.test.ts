import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import { it } from 'node:test'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { controlSocketPath } from '../../src/agent/control.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * Issue 15: a CLI command whose agent dies mid-call printed a raw Node stack trace
 * ("socket hang up"). Every CLI error must be one line that says what happened and
 * what to do. The "agent" here is a fake on the control socket that behaves badly.
 */

interface Run { code: number | null, stdout: string, stderr: string }

async function shoal (args: string[], timeoutMs = 30_000): Promise<Run> {
  return await new Promise(resolve => {
    execFile(SHOAL_BIN, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : null, stdout, stderr })
    })
  })
}

/** A fake agent on STATE's control socket; BEHAVE gets each connection once the request has arrived. */
async function fakeAgent (state: string, behave: (socket: Socket) => void): Promise<Server> {
  await mkdir(state, { recursive: true })
  const server = createServer(socket => {
    socket.once('data', () => behave(socket))
    socket.on('error', () => {})
  })
  await new Promise<void>(resolve => server.listen(controlSocketPath(state), resolve))
  return server
}

async function close (server: Server): Promise<void> {
  await new Promise<void>(resolve => server.close(() => resolve()))
}

function assertOneLine (run: Run, what: RegExp): void {
  const lines = run.stderr.trimEnd().split('\n')
  assert.equal(lines.length, 1, `one line of error, got:\n${run.stderr}`)
  assert.match(lines[0]!, /^shoal: /)
  assert.match(lines[0]!, what)
  assert.doesNotMatch(run.stderr, /^\s+at /m, 'no stack trace')
  assert.equal(run.code, 1)
}

const COMMANDS = (dir: string): string[][] => [
  ['ls'], ['stats'], ['mount', 'img', join(dir, 'mnt')], ['umount', join(dir, 'mnt')]
]

it('an agent that dies mid-call (connection closed, no answer): one line per command, no stack', { timeout: 120_000 }, async () => {
  const dir = await tempDir('shoal-cli-errors-')
  const state = join(dir, 'state')
  const server = await fakeAgent(state, socket => socket.destroy())
  try {
    for (const args of COMMANDS(dir)) {
      const run = await shoal([...args, '--state', state])
      process.stderr.write(`shoal ${args[0]}: exit ${run.code}, ${run.stderr.trimEnd().split('\n').length} lines of stderr: ${run.stderr.split('\n')[0]}\n`)
      assertOneLine(run, /agent .*closed the connection.*(shoal agent|journal|log)/i)
    }
  } finally {
    await close(server)
  }
})

it('an agent that dies mid-answer (headers, then the connection closes): one line', { timeout: 60_000 }, async () => {
  const dir = await tempDir('shoal-cli-errors-')
  const state = join(dir, 'state')
  const server = await fakeAgent(state, socket => {
    socket.write('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"mount')
    setTimeout(() => socket.destroy(), 50)
  })
  try {
    const run = await shoal(['ls', '--state', state])
    assertOneLine(run, /agent .*closed the connection/i)
  } finally {
    await close(server)
  }
})

it('no agent (a socket left by a killed one, or none): one line that says how to start one', { timeout: 60_000 }, async () => {
  const dir = await tempDir('shoal-cli-errors-')
  const run = await shoal(['ls', '--state', join(dir, 'nothing')])
  assertOneLine(run, /no shoal agent is running.*start one/)
})

it('a system error no command expected is one line too, not a stack trace', { timeout: 60_000 }, async () => {
  const dir = await tempDir('shoal-cli-errors-')
  const file = join(dir, 'file')
  await writeFile(file, '')
  // A directory under a regular file: mkdir fails with ENOTDIR, which keygen does not anticipate.
  const run = await shoal(['keygen', '--out', join(file, 'keys')])
  assertOneLine(run, /ENOTDIR.*check the path/)
  const connect = await shoal(['ls', '--state', join(file, 'state')])
  assertOneLine(connect, /cannot talk to the agent .*ENOTDIR; check that the path is the agent's state directory/)
})
