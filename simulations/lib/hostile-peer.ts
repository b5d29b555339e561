/**
 * A flooding swarm member for the hostile-peers fault, as its own process:
 *
 *   node hostile-peer.ts '{"stateDir", "layout", "image", "listen": [...], "bootstrap": [...], "targets": [...]}'
 *
 * It joins the image's swarms like an agent (JOINs of the manifest's and the
 * layers' keys to every peer it meets), so honest nodes count it as a member and
 * may pick it as a parent; it holds nothing and says so (`dont-have`, empty HAVE)
 * at once. (A member that never answers is another attack, and a costly one:
 * docs/ARCHITECTURE.md, "Threat model".) And it floods every target (an honest agent's multiaddr with
 * /p2p) on the chunk protocol, one stream per kind of flood, the attacks of
 * issue 15 (test/p2p/hostile.test.ts has them one at a time):
 * - `have`:   HAVE? queries for the image's packs, as fast as the stream takes them, answers read;
 * - `join`:   JOINs of 32 random swarm keys each, answers read;
 * - `want`:   holder WANTs for the image's chunks, 64 to a frame, the stream never read;
 * - `churn`:  WANT then CANCEL of each chunk in a tight loop (holder requests for
 *             real chunks, parent requests for unknown digests), answers read.
 * A stream the target closes (it does, for the floods its limits call hostile) is
 * opened again after a pause, for as long as the process runs.
 *
 * Prints `{"peerId", "multiaddrs"}` when ready, then every second its counters
 * (`HostilePeerStats`): frames and bytes sent, answers read, streams opened and closed by the target.
 */
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import type { Stream } from '@libp2p/interface'
import { messageStreamToDuplex } from '@libp2p/utils'
import { multiaddr } from '@multiformats/multiaddr'
import { pipe } from 'it-pipe'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { openImageView } from '../../src/image/image-view.ts'
import { DirOrigin } from '../../src/origin/dir-origin.ts'
import { sleep } from '../../src/util/limit.ts'
import {
  CHUNK_PROTOCOL, MAX_BATCH, MAX_CLIENT_FRAME, MAX_JOIN_KEYS, MAX_SERVER_FRAME, decodeClientMessage, encodeCancel, encodeChunkReply, encodeHave, encodeHaveQuery, encodeJoin, encodeWant, frameDecoder, type WantItem
} from '../../src/p2p/chunk-protocol.ts'
import { createPeerNode } from '../../src/p2p/node.ts'

interface Options { stateDir: string, layout: string, image: string, listen: string[], bootstrap: string[], targets: string[] }
export type Flood = 'have' | 'join' | 'want' | 'churn'
export const FLOODS: readonly Flood[] = ['have', 'join', 'want', 'churn']
export interface HostilePeerStats {
  /** Frames and bytes sent, per flood. */
  frames: Record<Flood, number>
  sentBytes: number
  /** Frames read back (answers, MEMBERS). */
  answers: number
  receivedBytes: number
  /** Flood streams opened, and those that ended (closed or reset by the target, or a dial refused), each opened again after REOPEN_MS. */
  opened: number
  closedByTarget: number
  /** Chunk requests from honest nodes, answered dont-have. */
  refusedRequests: number
}

/** Pause before a closed flood stream is opened again: a persistent attacker, not a busy loop of dials. */
const REOPEN_MS = 500

const options = JSON.parse(process.argv[2]!) as Options
const origin = await DirOrigin.open(options.layout)
const image = await openImageView(origin, options.image, { trusted: 'skip', catalogDir: join(options.stateDir, 'catalogs') })
const packs = image.image.config.layers.flatMap(l => l.packs.map(p => p.digest))
const chunks = image.view.catalogs.flatMap(c => packs.flatMap(p => c.packChunks(p))).map(c => ({ digest: c.digest, length: c.length }))
const swarmKeys: Digest[] = [...image.image.config.layers.map(l => l.catalog.digest), image.image.manifestDigest].slice(-MAX_JOIN_KEYS)
const stats: HostilePeerStats = { frames: { have: 0, join: 0, want: 0, churn: 0 }, sentBytes: 0, answers: 0, receivedBytes: 0, opened: 0, closedByTarget: 0, refusedRequests: 0 }

const node = await createPeerNode({ stateDir: options.stateDir, listen: options.listen, bootstrap: options.bootstrap })
// A member that holds nothing.
await node.libp2p.handle(CHUNK_PROTOCOL, stream => {
  void pipe(messageStreamToDuplex(stream).source, frameDecoder(MAX_CLIENT_FRAME), async frames => {
    for await (const frame of frames) {
      const message = decodeClientMessage(frame)
      if (message.type === 'want') {
        for (const item of message.items) {
          stats.refusedRequests++
          stream.send(encodeChunkReply(item.id, 'dont-have'))
        }
      } else if (message.type === 'have-query') stream.send(encodeHave(message.id, message.pack, []))
    }
  }).catch(() => {})
}, { maxInboundStreams: 16 })

const stopping = new AbortController()
process.stdout.write(JSON.stringify({ peerId: node.peerId.toString(), multiaddrs: node.multiaddrs() }) + '\n')
const timer = setInterval(() => process.stdout.write(JSON.stringify(stats) + '\n'), 1000)
process.once('SIGTERM', () => {
  clearInterval(timer)
  stopping.abort()
  void node.stop().finally(() => process.exit(0))
})

/** Frames sent without a turn of the event loop: a buffer that takes everything must not starve the reads and dials. */
const FRAMES_PER_TURN = 64
let unyielded = 0

/** Sends a frame, waiting while the stream's buffer is full (the target's flow control is what slows a flood). */
async function send (stream: Stream, flood: Flood, frame: Uint8Array): Promise<void> {
  stats.frames[flood]++
  stats.sentBytes += frame.byteLength
  if (!stream.send(frame)) {
    await stream.onDrain({ signal: stopping.signal })
    unyielded = 0
  } else if (++unyielded >= FRAMES_PER_TURN) {
    await new Promise(resolve => setImmediate(resolve))
    unyielded = 0
  }
}

/** Reads and counts every frame the target sends on STREAM. */
function readAll (stream: Stream): void {
  void pipe(messageStreamToDuplex(stream).source, frameDecoder(MAX_SERVER_FRAME), async frames => {
    for await (const frame of frames) {
      stats.answers++
      stats.receivedBytes += 4 + frame.byteLength
    }
  }).catch(() => {})
}

let nextId = 1
const randomDigest = (): Digest => sha256(randomBytes(32))

/** One flood on one stream, until the stream is closed. */
async function flood (stream: Stream, kind: Flood): Promise<void> {
  if (kind === 'want') stream.pause()
  else readAll(stream)
  let i = 0
  if (kind === 'join') await send(stream, kind, encodeJoin(swarmKeys, node.multiaddrs()))
  while (!stopping.signal.aborted && stream.status === 'open') {
    if (kind === 'have') {
      await send(stream, kind, encodeHaveQuery(nextId++, packs[i++ % packs.length]!))
    } else if (kind === 'join') {
      await send(stream, kind, encodeJoin(Array.from({ length: MAX_JOIN_KEYS }, randomDigest), node.multiaddrs()))
    } else if (kind === 'want') {
      const items: WantItem[] = Array.from({ length: MAX_BATCH }, () => ({ id: nextId++, ...chunks[i++ % chunks.length]!, fetch: false, waitMs: 0 }))
      await send(stream, kind, encodeWant(items))
    } else {
      // A holder request for a real chunk, a parent request for a digest nobody knows (the target waits to learn it), each cancelled at once.
      const held = { id: nextId++, ...chunks[i++ % chunks.length]!, fetch: false, waitMs: 0 }
      const unknown = { id: nextId++, digest: randomDigest(), length: 4096, fetch: true, waitMs: 5000 }
      await send(stream, kind, encodeWant([held, unknown]))
      await send(stream, kind, encodeCancel(held.id))
      await send(stream, kind, encodeCancel(unknown.id))
    }
  }
}

/** Keeps one stream of each flood open to TARGET for as long as the process runs. */
async function attack (target: string): Promise<void> {
  const address = multiaddr(target)
  await Promise.all(FLOODS.map(async kind => {
    while (!stopping.signal.aborted) {
      try {
        const stream = await node.libp2p.dialProtocol(address, CHUNK_PROTOCOL, { signal: AbortSignal.any([stopping.signal, AbortSignal.timeout(10_000)]) })
        stats.opened++
        await flood(stream, kind)
      } catch {
        // Refused, reset or closed by the target: that is its defence working.
      }
      if (!stopping.signal.aborted) stats.closedByTarget++
      await sleep(REOPEN_MS, stopping.signal).catch(() => {})
    }
  }))
}

// The join flood's first JOIN carries the image's keys: a member of its swarms, then a flood (4 streams: the most a connection may open).
await Promise.all(options.targets.map(attack))
