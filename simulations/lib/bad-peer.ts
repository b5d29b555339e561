/**
 * A hostile swarm member for the bad-peers fault, as its own process:
 *
 *   node bad-peer.ts '{"stateDir", "layout", "image", "listen": [...], "bootstrap": [...]}'
 *
 * It joins the swarm like an agent (shoal's own libp2p node), announces every
 * pack of the image and every layer's swarm key, claims to hold all of each
 * pack when asked (HAVE), and answers every WANT, parent requests included,
 * with the real chunk bytes with one bit flipped: the right length, so only the SHA-256 check can catch it.
 * The agent's ChunkServer re-hashes before it sends, so this peer speaks the
 * wire protocol itself (with src/p2p/chunk-protocol.ts's codec).
 *
 * Prints `{"peerId", "multiaddrs"}` when ready, then every second
 * `{"wants", "corrupted", "haves"}`.
 */
import type { Stream } from '@libp2p/interface'
import { messageStreamToDuplex } from '@libp2p/utils'
import { pipe } from 'it-pipe'
import { join } from 'node:path'
import type { Uint8ArrayList } from 'uint8arraylist'
import { OriginChunkSource } from '../../src/fetch/chunk-source.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { RangeReader } from '../../src/origin/range-reader.ts'
import { ChunkClient } from '../../src/p2p/chunk-client.ts'
import { CHUNK_PROTOCOL, MAX_CLIENT_FRAME, MAX_JOIN_KEYS, decodeClientMessage, encodeChunkReply, encodeHave, frameDecoder, type WantItem } from '../../src/p2p/chunk-protocol.ts'
import { createPeerNode } from '../../src/p2p/node.ts'
import { DhtPackRouter } from '../../src/p2p/pack-router.ts'

interface Options { stateDir: string, layout: string, image: string, listen: string[], bootstrap: string[] }
export interface BadPeerStats { wants: number, corrupted: number, haves: number }

const options = JSON.parse(process.argv[2]!) as Options
const origin = await DirOrigin.open(options.layout)
const image = await openImageView(origin, options.image, { trusted: 'skip', catalogDir: join(options.stateDir, 'catalogs') })
const source = new OriginChunkSource(new RangeReader({ origin }))
const packSizes = new Map<Digest, number>(image.image.config.layers.flatMap(l => l.packs.map(p => [p.digest, p.size] as const)))
const stats: BadPeerStats = { wants: 0, corrupted: 0, haves: 0 }

const node = await createPeerNode({ stateDir: options.stateDir, listen: options.listen, bootstrap: options.bootstrap })
await node.libp2p.handle(CHUNK_PROTOCOL, stream => { void serve(stream) }, { maxInboundStreams: 16 })
const router = new DhtPackRouter(node.libp2p)
// The router retries a failed provide on its own; the first attempt may come before the routing table fills.
// Agents find a layer's packs under the layer's catalog digest (Peering.join): announce those keys too.
const swarmKeys = [...packSizes.keys(), ...image.image.config.layers.map(l => l.catalog.digest), image.image.manifestDigest]
for (const key of swarmKeys) void router.announce(key, { signal: AbortSignal.timeout(60_000) }).catch(() => {})
// And it tells every peer it meets that it is in those swarms (JOIN), like an agent, so burst
// nodes see it from the start, not only once its DHT records are found.
const joiner = new ChunkClient(node.libp2p)
const joinKeys = swarmKeys.slice(-MAX_JOIN_KEYS)
for (const peer of node.connectedPeers()) joiner.join(peer, joinKeys, node.multiaddrs())
node.libp2p.addEventListener('peer:connect', event => joiner.join(event.detail, joinKeys, node.multiaddrs()))

process.stdout.write(JSON.stringify({ peerId: node.peerId.toString(), multiaddrs: node.multiaddrs() }) + '\n')
const timer = setInterval(() => process.stdout.write(JSON.stringify(stats) + '\n'), 1000)
process.once('SIGTERM', () => {
  clearInterval(timer)
  joiner.close()
  router.stop()
  void node.stop().finally(() => process.exit(0))
})

async function serve (stream: Stream): Promise<void> {
  const send = async (data: Uint8Array | Uint8ArrayList): Promise<void> => {
    if (!stream.send(data)) await stream.onDrain({ signal: AbortSignal.timeout(10_000) })
  }
  try {
    await pipe(messageStreamToDuplex(stream).source, frameDecoder(MAX_CLIENT_FRAME), async (frames: AsyncIterable<Uint8ArrayList>) => {
      for await (const frame of frames) {
        const message = decodeClientMessage(frame)
        if (message.type === 'have-query') {
          stats.haves++
          const size = packSizes.get(message.pack)
          await send(encodeHave(message.id, message.pack, size === undefined ? [] : [{ offset: 0, length: size }]))
        } else if (message.type === 'want') {
          for (const item of message.items) void answer(item, send)
        }
      }
    })
  } catch {
    // The requester banned us and hung up: that is the point.
  }
}

async function answer (item: WantItem, send: (data: Uint8ArrayList) => Promise<void>): Promise<void> {
  stats.wants++
  const ref = image.view.catalogs.map(c => c.chunk(item.digest)).find(r => r !== undefined)
  if (ref === undefined) {
    await send(encodeChunkReply(item.id, 'dont-have')).catch(() => {})
    return
  }
  const bytes = Uint8Array.from(await source.get(ref, { signal: AbortSignal.timeout(10_000) }))
  bytes[bytes.length >> 1]! ^= 0x01
  stats.corrupted++
  await send(encodeChunkReply(item.id, 'data', bytes)).catch(() => {})
}
