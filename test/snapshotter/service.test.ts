/**
 * The socket side of serveSnapshotter: permissions, stale and live sockets, path
 * length, and a close that does not wait for a wedged call.
 */
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { lstat, mkdir, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import * as grpc from '@grpc/grpc-js'
import { serveSnapshotter } from '../../src/snapshotter/service.ts'
import { Snapshotter } from '../../src/snapshotter/snapshotter.ts'
import { tempDir } from '../helpers/tmp.ts'
import { FakeRemoteLayers, SnapshotsClient, statusOf, TARGET_LABEL } from './helpers.ts'

/** A socket file whose server was SIGKILLed: what a crashed agent leaves. */
async function staleSocket (path: string): Promise<void> {
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`])
  await new Promise(resolve => child.once('exit', resolve))
  assert.ok((await lstat(path)).isSocket())
}

describe('serveSnapshotter', () => {
  it('listens on a 0600 socket, replacing a stale one, and removes it on close', async () => {
    const dir = await tempDir('shoal-snap-svc-')
    const snapshotter = await Snapshotter.open({ root: join(dir, 'root') })
    const socket = join(dir, 'run', 'snap.sock')
    await mkdir(join(dir, 'run'))
    await staleSocket(socket)
    const server = await serveSnapshotter(snapshotter, socket)
    try {
      assert.equal((await lstat(socket)).mode & 0o777, 0o600)
      const client = new SnapshotsClient(socket)
      try {
        await client.prepare('k')
        assert.equal((await client.stat('k')).name, 'k')
        // The agent closes the snapshotter while containerd still calls.
        await snapshotter.close()
        const closed = await statusOf(client.stat('k'))
        assert.equal(closed.code, grpc.status.UNAVAILABLE)
        assert.match(closed.details, /shutting down/)
      } finally {
        client.close()
      }
    } finally {
      await server.close()
      await snapshotter.close()
    }
    await assert.rejects(lstat(socket), { code: 'ENOENT' })
  })

  it('refuses a socket another process serves, a file that is not a socket, and a path too long for a socket', async () => {
    const dir = await tempDir('shoal-snap-svc-')
    const snapshotter = await Snapshotter.open({ root: join(dir, 'root') })
    const live = createServer()
    const livePath = join(dir, 'live.sock')
    await new Promise<void>(resolve => live.listen(livePath, resolve))
    try {
      await assert.rejects(serveSnapshotter(snapshotter, livePath), /another process is serving .*live\.sock/)
      const file = join(dir, 'file')
      await writeFile(file, 'not a socket')
      await assert.rejects(serveSnapshotter(snapshotter, file), /exists and is not a socket/)
      const long = join(dir, 'x'.repeat(120) + '.sock')
      await assert.rejects(serveSnapshotter(snapshotter, long), /unix sockets allow at most 107/)
    } finally {
      await new Promise(resolve => live.close(resolve))
      await snapshotter.close()
    }
  })

  it('closes promptly while a call hangs, and closing the snapshotter aborts that call', async () => {
    const dir = await tempDir('shoal-snap-svc-')
    const fake = new FakeRemoteLayers(join(dir, 'layers'))
    fake.mode = 'hang'
    const snapshotter = await Snapshotter.open({ root: join(dir, 'root'), remote: fake })
    const socket = join(dir, 'snap.sock')
    const server = await serveSnapshotter(snapshotter, socket, { shutdownTimeoutMs: 200 })
    const client = new SnapshotsClient(socket)
    try {
      const hanging = statusOf(client.prepare('k', '', { [TARGET_LABEL]: 'sha256:hang' }))
      while (fake.prepared.length === 0) await new Promise(resolve => setTimeout(resolve, 10))
      const started = Date.now()
      await server.close()
      assert.ok(Date.now() - started < 3_000, `close took ${Date.now() - started} ms`)
      assert.notEqual((await hanging).code, grpc.status.OK)
    } finally {
      client.close()
      await server.close()
      await snapshotter.close()
    }
    assert.equal(fake.lastSignal?.aborted, true, 'closing the snapshotter aborts the call in progress')
    await assert.rejects(snapshotter.stat('k'), /shutting down/)
  })
})
