/**
 * A TCP proxy on 127.0.0.1 that caps the bytes flowing from the upstream server to
 * clients with one token bucket shared by all connections: the same cap, and the
 * same TokenBucket class, as `startOriginServer({ rate })`, so that a registry
 * behind it and a shoal origin are equally slow. Client-to-server bytes (requests)
 * are not paced.
 */
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'
import { pipeline, Transform, type TransformCallback } from 'node:stream'
import { TokenBucket } from '../../src/util/token-bucket.ts'

export interface ThrottleProxy {
  /** host:port */
  readonly address: string
  readonly port: number
  readonly stats: { connections: number, bytesDown: number, bytesUp: number }
  close (): Promise<void>
}

export async function startThrottleProxy (options: { upstreamPort: number, upstreamHost?: string, rate: number }): Promise<ThrottleProxy> {
  const bucket = new TokenBucket(options.rate, { capacity: options.rate / 10 })
  const stats = { connections: 0, bytesDown: 0, bytesUp: 0 }
  const sockets = new Set<Socket>()
  // Half-open allowed on both sides: each direction ends on its own, as TCP lets it.
  const server = createServer({ allowHalfOpen: true }, client => {
    stats.connections++
    const upstream = connect({ host: options.upstreamHost ?? '127.0.0.1', port: options.upstreamPort, allowHalfOpen: true })
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.once('close', () => sockets.delete(s))
      s.setNoDelay(true)
    }
    // Requests: plain pipe, not pipeline. pipeline() destroys every stream of its
    // chain when one fails, and the server closing its socket after a response
    // would then destroy the client while the end of that response still sits in
    // the pacer.
    const up = new Counter(n => { stats.bytesUp += n })
    client.pipe(up).pipe(upstream)
    client.on('error', () => { upstream.destroy() })
    // Responses: paced; a failure on either side ends both.
    const down = new Pacer(bucket, n => { stats.bytesDown += n })
    pipeline(upstream, down, client, err => {
      if (err !== undefined && err !== null) { client.destroy(); upstream.destroy() }
    })
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => { server.off('error', reject); resolve() })
  })
  const port = (server.address() as AddressInfo).port
  let closing: Promise<void> | undefined
  return {
    address: `127.0.0.1:${port}`,
    port,
    stats,
    close: () => {
      closing ??= new Promise<void>(resolve => {
        server.close(() => resolve())
        for (const s of sockets) s.destroy()
      })
      return closing
    }
  }
}

class Counter extends Transform {
  private readonly count: (n: number) => void
  constructor (count: (n: number) => void) { super(); this.count = count }
  override _transform (chunk: Buffer, _e: BufferEncoding, cb: TransformCallback): void { this.count(chunk.length); cb(null, chunk) }
}

/** Paces bytes through BUCKET in pieces no larger than a burst (as the origin server's meter does). */
class Pacer extends Transform {
  private readonly bucket: TokenBucket
  private readonly count: (n: number) => void
  private readonly pieceSize: number
  private readonly abort = new AbortController()

  constructor (bucket: TokenBucket, count: (n: number) => void) {
    super()
    this.bucket = bucket
    this.count = count
    this.pieceSize = Math.min(64 * 1024, Math.max(1024, Math.floor(bucket.capacity)))
  }

  override _transform (chunk: Buffer, _e: BufferEncoding, cb: TransformCallback): void {
    this.pace(chunk).then(() => cb(), cb)
  }

  private async pace (chunk: Buffer): Promise<void> {
    for (let at = 0; at < chunk.length; at += this.pieceSize) {
      const piece = chunk.subarray(at, at + this.pieceSize)
      await this.bucket.take(piece.length, this.abort.signal)
      this.count(piece.length)
      this.push(piece)
    }
  }

  override _destroy (error: Error | null, cb: (error?: Error | null) => void): void {
    this.abort.abort()
    cb(error)
  }
}
