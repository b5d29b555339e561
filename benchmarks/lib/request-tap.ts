/**
 * A pass-through TCP proxy on 127.0.0.1 that records the HTTP/1.x requests going
 * through it: when each request head was sent, when the first and the last byte of
 * the answer came back, and how many bytes. For benchmark traces only (no pacing, no
 * changes to the bytes): put it in front of a throttle proxy to see the requests a
 * client makes, in order, with their timing.
 *
 * Clients here (containerd's Go client, undici) do not pipeline, so the bytes that
 * flow back between a request and the next one on the same connection are that
 * request's answer.
 */
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'

export interface TappedRequest {
  connection: number
  /** ms since the tap started (performance.now() based). */
  sentAt: number
  firstByteAt?: number
  lastByteAt?: number
  method: string
  path: string
  range?: string
  userAgent?: string
  bytes: number
}

export interface RequestTap {
  address: string
  port: number
  /** performance.now() when the tap started: sentAt etc. are relative to it. */
  startedAt: number
  requests: TappedRequest[]
  close (): Promise<void>
}

export async function startRequestTap (options: { upstreamPort: number }): Promise<RequestTap> {
  const startedAt = performance.now()
  const now = (): number => performance.now() - startedAt
  const requests: TappedRequest[] = []
  const sockets = new Set<Socket>()
  let connections = 0
  const server = createServer({ allowHalfOpen: true }, client => {
    const id = ++connections
    const upstream = connect({ host: '127.0.0.1', port: options.upstreamPort, allowHalfOpen: true })
    for (const s of [client, upstream]) { sockets.add(s); s.once('close', () => sockets.delete(s)); s.setNoDelay(true) }
    let head = ''
    let current: TappedRequest | undefined
    client.on('data', (data: Buffer) => {
      // Request heads: accumulate text until a blank line; bodies (uploads) are not expected here.
      head += data.toString('latin1')
      for (;;) {
        const end = head.indexOf('\r\n\r\n')
        if (end < 0) break
        const lines = head.slice(0, end).split('\r\n')
        head = head.slice(end + 4)
        const [method, path] = (lines[0] ?? '').split(' ')
        const header = (name: string): string | undefined => lines.find(l => l.toLowerCase().startsWith(`${name}:`))?.slice(name.length + 1).trim()
        current = { connection: id, sentAt: now(), method: method ?? '?', path: path ?? '?', bytes: 0, ...opt('range', header('range')), ...opt('userAgent', header('user-agent')) }
        requests.push(current)
      }
      if (head.length > 64 * 1024) head = ''
      upstream.write(data)
    })
    client.on('end', () => upstream.end())
    upstream.on('data', (data: Buffer) => {
      if (current !== undefined) {
        current.firstByteAt ??= now()
        current.lastByteAt = now()
        current.bytes += data.length
      }
      client.write(data)
    })
    upstream.on('end', () => client.end())
    client.on('error', () => upstream.destroy())
    upstream.on('error', () => client.destroy())
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
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
    startedAt,
    requests,
    close: () => {
      closing ??= new Promise<void>(resolve => {
        server.close(() => resolve())
        for (const s of sockets) s.destroy()
      })
      return closing
    }
  }
}

function opt<K extends string> (key: K, value: string | undefined): Partial<Record<K, string>> {
  return value === undefined ? {} : { [key]: value } as Record<K, string>
}
