import { createCipheriv, createHash, randomBytes } from 'node:crypto'
import { after } from 'node:test'
import type { ChunkRef } from '../../src/format/catalog.ts'
import { sha256, type Digest } from '../../src/oci/digest.ts'
import { sleep } from '../../src/util/limit.ts'
import type { PeerId } from '@libp2p/interface'
import type { ByteRange } from '../../src/p2p/chunk-protocol.ts'
import type { LocalChunks } from '../../src/p2p/chunk-server.ts'
import { createPeerNode, type PeerNode, type PeerNodeOptions } from '../../src/p2p/node.ts'
import type { PackRouter, SwarmAnswer } from '../../src/p2p/pack-router.ts'
import { tempDir } from '../helpers/tmp.ts'

/**
 * Starts `count` real libp2p nodes on 127.0.0.1; every node after the first
 * bootstraps to the first. All are stopped when the test file ends.
 */
export async function startNodes (count: number, options: Partial<PeerNodeOptions> = {}): Promise<PeerNode[]> {
  const first = await startNode(options)
  const rest = await Promise.all(Array.from({ length: count - 1 }, async () => await startNode({ bootstrap: first.multiaddrs(), ...options })))
  // The dialler returns before the first node has finished upgrading its side; a stream opened
  // from there in that window would look for the peer's addresses in the DHT instead.
  await waitFor('the first node to see every connection', () => rest.every(node => first.connectedPeers().some(p => p.equals(node.peerId))) ? true : undefined)
  return [first, ...rest]
}

export async function startNode (options: Partial<PeerNodeOptions> = {}): Promise<PeerNode> {
  const node = await createPeerNode({ stateDir: await tempDir('shoal-p2p-'), ...options })
  after(async () => await node.stop())
  return node
}

/**
 * Polls `check` until it returns a value other than undefined. This is a
 * bounded wait for asynchronous setup (routing tables filling), not a timing
 * assertion: it fails with `what` only if the condition never comes.
 */
export async function waitFor<T> (what: string, check: () => Promise<T | undefined> | T | undefined, limitMs = 20_000): Promise<T> {
  const deadline = Date.now() + limitMs
  while (true) {
    const value = await check()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`)
    await sleep(50)
  }
}

export interface TestChunk { ref: ChunkRef, bytes: Uint8Array }

/** A synthetic pack: random chunks laid end to end, stored uncompressed. */
export function makePack (sizes: number[], fill: (i: number) => Uint8Array = i => randomBytes(sizes[i]!)): { pack: Digest, chunks: TestChunk[] } {
  const bodies = sizes.map((_, i) => fill(i))
  const pack = sha256(Buffer.concat(bodies))
  let offset = 0
  const chunks = bodies.map(bytes => {
    const ref: ChunkRef = { digest: sha256(bytes), length: bytes.length, pack, packOffset: offset, storedLength: bytes.length, codec: 0 }
    offset += bytes.length
    return { ref, bytes }
  })
  return { pack, chunks }
}

/** The same pack in every process that passes the same seed (an AES-CTR keystream as the bytes). */
export function seededPack (seed: string, count: number, size: number): { pack: Digest, chunks: TestChunk[] } {
  const key = createHash('sha256').update(seed).digest()
  const stream = createCipheriv('aes-256-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(count * size))
  return makePack(Array.from({ length: count }, () => size), i => stream.subarray(i * size, (i + 1) * size))
}

/**
 * LocalChunks over a map: what the agent's verified cache looks like to the
 * chunk server. `fetch` stands in for the agent's resolver on owner requests.
 */
export class MemoryChunks implements LocalChunks {
  readonly chunks = new Map<Digest, TestChunk>()
  fetch: ((digest: Digest, signal: AbortSignal) => Promise<Uint8Array | undefined>) | undefined
  compressible: ((digest: Digest) => boolean) | undefined
  /** Makes every get wait first (a slow disk, or a peer about to die). */
  delayMs = 0
  gets = 0
  /** Gets whose signal aborted while they waited (the requester cancelled). */
  aborted = 0

  add (...chunks: TestChunk[]): this {
    for (const chunk of chunks) this.chunks.set(chunk.ref.digest, chunk)
    return this
  }

  async get (digest: Digest, options: { signal: AbortSignal, fetch: boolean }): Promise<Uint8Array | undefined> {
    this.gets++
    if (this.delayMs > 0) {
      await sleep(this.delayMs, options.signal).catch((err: unknown) => {
        this.aborted++
        throw err
      })
    }
    const held = this.chunks.get(digest)
    if (held !== undefined) return held.bytes
    if (options.fetch && this.fetch !== undefined) return await this.fetch(digest, options.signal)
    return undefined
  }

  async held (pack: Digest): Promise<readonly ByteRange[]> {
    return [...this.chunks.values()]
      .filter(c => c.ref.pack === pack)
      .map(c => ({ offset: c.ref.packOffset, length: c.ref.storedLength }))
  }
}

/** A router with a fixed swarm, for tests about the exchange rather than the DHT. */
export class StaticRouter implements PackRouter {
  readonly peers: readonly PeerId[]
  constructor (peers: readonly PeerId[]) { this.peers = peers }
  async announce (): Promise<void> {}
  answer (): SwarmAnswer { return { peers: this.peers, settled: true } }
  async settled (): Promise<void> {}
}
