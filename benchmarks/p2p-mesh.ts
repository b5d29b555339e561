/**
 * What a libp2p connection costs in CPU: N peer nodes (createPeerNode, as the agent
 * runs them: TCP, Noise, Yamux, identify, ping, kad-dht) in this one process dial
 * each other into a full mesh, as a small cluster's agents end up after their DHT
 * self-queries. Prints the process's CPU for the dials and for the few seconds
 * after (identify, the DHT's pings of new contacts), per connection, both ends
 * together.
 *
 *   node benchmarks/p2p-mesh.ts [--nodes 20] [--settle-ms 3000]
 *
 * Prints JSON.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseScriptArgs } from '../scripts/lib/args.ts'
import { reportErrors } from '../scripts/lib/errors.ts'
import { createPeerNode, type PeerNode } from '../src/p2p/node.ts'

reportErrors('p2p-mesh')
const args = parseScriptArgs({
  script: 'p2p-mesh',
  usage: 'usage: node benchmarks/p2p-mesh.ts [--nodes N >= 2 (default 20)] [--settle-ms MS (default 3000)]',
  options: { nodes: { type: 'string', default: '20' }, 'settle-ms': { type: 'string', default: '3000' } }
})
const count = args.int('nodes', { min: 2 })
const settleMs = args.number('settle-ms', { min: 0 })

const cpuSeconds = (): number => {
  const { user, system } = process.cpuUsage()
  return (user + system) / 1e6
}
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

const stateRoot = await mkdtemp(join(tmpdir(), 'shoal-bench-mesh-'))
const nodes: PeerNode[] = []
try {
  for (let i = 0; i < count; i++) nodes.push(await createPeerNode({ stateDir: join(stateRoot, String(i)) }))
  // Their own start-up work (the DHT's first self-query) out of the way first.
  await sleep(1000)
  const before = cpuSeconds()
  const started = performance.now()
  await Promise.all(nodes.flatMap((a, i) => nodes.slice(i + 1).map(async b =>
    await a.libp2p.dial(b.libp2p.getMultiaddrs()[0]!, { signal: AbortSignal.timeout(30_000) }))))
  const dialled = cpuSeconds()
  const wallMs = performance.now() - started
  await sleep(settleMs)
  const settled = cpuSeconds()
  const connections = count * (count - 1) / 2
  process.stdout.write(JSON.stringify({
    nodes: count,
    connections,
    dialWallMs: Math.round(wallMs),
    dialCpuSeconds: +(dialled - before).toFixed(3),
    afterCpuSeconds: +(settled - dialled).toFixed(3),
    cpuMsPerConnection: +((settled - before) * 1000 / connections).toFixed(1)
  }) + '\n')
} finally {
  await Promise.all(nodes.map(async n => await n.stop()))
  await rm(stateRoot, { recursive: true, force: true })
}
