import assert from 'node:assert/strict'
import { chmod, readFile, stat, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { test } from 'node:test'
import { PeerConfigError, PeerKeyError, SwarmKeyError } from '../../src/p2p/errors.ts'
import { createPeerNode, generatePsk, loadOrCreatePsk, parsePsk } from '../../src/p2p/node.ts'
import { tempDir } from '../helpers/tmp.ts'
import { startNode, waitFor } from './helpers.ts'

test('node: the peer identity persists in stateDir/peer.key, mode 0600', async () => {
  const stateDir = await tempDir()
  const first = await createPeerNode({ stateDir })
  const id = first.peerId.toString()
  assert.match(first.multiaddrs()[0]!, /^\/ip4\/127\.0\.0\.1\/tcp\/\d+\/p2p\/12D3KooW/)
  await first.stop()
  assert.equal((await stat(join(stateDir, 'peer.key'))).mode & 0o777, 0o600)

  const again = await createPeerNode({ stateDir })
  assert.equal(again.peerId.toString(), id, 'same key, same peer id')
  await again.stop()

  await chmod(join(stateDir, 'peer.key'), 0o644)
  await assert.rejects(createPeerNode({ stateDir }), (err: unknown) => err instanceof PeerKeyError && /readable by other users.*chmod 600/.test(err.message))
  await writeFile(join(stateDir, 'peer.key'), 'not a key', { mode: 0o600 })
  await chmod(join(stateDir, 'peer.key'), 0o600)
  await assert.rejects(createPeerNode({ stateDir }), (err: unknown) => err instanceof PeerKeyError && /not a protobuf-encoded libp2p private key/.test(err.message))
})

test('node: announce addresses replace the listen addresses peers are told about', async () => {
  const node = await startNode({ announce: ['/ip4/10.1.2.3/tcp/4001'] })
  assert.deepEqual(node.multiaddrs(), [`/ip4/10.1.2.3/tcp/4001/p2p/${node.peerId.toString()}`])
})

test('node: swarm keys are created once, in the swarm.key v1 format, and checked on load', async () => {
  const dir = await tempDir()
  const file = join(dir, 'swarm.key')
  const created = await loadOrCreatePsk(file)
  assert.equal((await stat(file)).mode & 0o777, 0o600)
  assert.match(Buffer.from(created).toString(), /^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}$/)
  assert.deepEqual(await loadOrCreatePsk(file), created, 'a second load reads the same key')
  assert.deepEqual(parsePsk(Buffer.from(Buffer.from(created).toString().replace(/\n/g, '\r\n') + '\n')), created, 'CRLF and a trailing newline are tolerated')
  assert.notDeepEqual(generatePsk(), generatePsk())

  await writeFile(file, '/key/swarm/psk/1.0.0/\n/base64/\nabc')
  await assert.rejects(loadOrCreatePsk(file), (err: unknown) => err instanceof SwarmKeyError && /second line must be \/base16\//.test(err.message))
  assert.throws(() => parsePsk(Buffer.from('/key/swarm/psk/1.0.0/\n/base16/\n1234')), /64 hex digits/)
  assert.ok((await readFile(file)).length > 0)
})

test('node: bad bootstrap and allow entries are refused with a clear error', async () => {
  const stateDir = await tempDir()
  await assert.rejects(createPeerNode({ stateDir, bootstrap: ['no-port-here'] }), (err: unknown) => err instanceof PeerConfigError && /host:port/.test(err.message))
  await assert.rejects(createPeerNode({ stateDir, bootstrap: ['/ip4/1.2.3.4/tcp/x'] }), PeerConfigError)
  await assert.rejects(createPeerNode({ stateDir, allow: ['10.0.0.0/33'] }), /not a CIDR/)
})

async function freePort (host: string): Promise<number> {
  const server = createServer()
  await new Promise<void>(resolve => server.listen(0, host, resolve))
  const { port } = server.address() as { port: number }
  await new Promise(resolve => server.close(resolve))
  return port
}

test('node: a DNS name bootstraps to every address it resolves to (headless service), never to ourselves', async () => {
  const port = await freePort('127.0.0.2')
  const hosts = ['127.0.0.2', '127.0.0.3', '127.0.0.4']
  const resolveHost = async (name: string): Promise<string[]> => {
    assert.equal(name, 'shoal.default.svc.cluster.local')
    return hosts
  }
  const pods = await Promise.all(hosts.map(async ip => await startNode({ listen: [`/ip4/${ip}/tcp/${port}`] })))
  const newcomer = await startNode({ bootstrap: [`shoal.default.svc.cluster.local:${port}`], resolveHost })
  assert.deepEqual(new Set(newcomer.connectedPeers().map(String)), new Set(pods.map(p => p.peerId.toString())))

  // A pod resolving its own service skips its own address.
  const dialled = await pods[0]!.bootstrap({ signal: AbortSignal.timeout(10_000) })
  assert.equal(dialled, 0, 'nothing dialled: pod 0 has no bootstrap list of its own')
  const self = await startNode({ listen: [`/ip4/127.0.0.5/tcp/${port}`], bootstrap: [`/dns4/shoal.default.svc.cluster.local/tcp/${port}`], resolveHost: async () => [...hosts, '127.0.0.5'] })
  await waitFor('the self-dialling pod to connect', () => self.connectedPeers().length >= 3 ? true : undefined)
  assert.ok(!self.connectedPeers().some(p => p.equals(self.peerId)))
  assert.equal(await self.bootstrap({ signal: AbortSignal.timeout(10_000) }), 3, 'three dials, not four')
})
