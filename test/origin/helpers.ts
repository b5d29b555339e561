import { mkdtemp, rm } from 'node:fs/promises'
import { request, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse, createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Digest } from '../../src/oci/digest.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import { MediaType, type Descriptor } from '../../src/oci/types.ts'

/** Deterministic pseudo-random bytes (xorshift32), so a failing test shows the same data every run. */
export function bytes (length: number, seed = 1): Uint8Array {
  const words = new Uint32Array(Math.ceil(length / 4))
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13; x >>>= 0
    x ^= x >>> 17
    x ^= x << 5; x >>>= 0
    words[i] = x
  }
  return new Uint8Array(words.buffer, 0, length)
}

export interface TestLayout {
  dir: string
  layout: OciLayout
  small: { digest: Digest, data: Uint8Array }
  /** 3 MiB: large enough for many merged 64 KiB reads. */
  big: { digest: Digest, data: Uint8Array }
  empty: { digest: Digest, data: Uint8Array }
  manifest: Descriptor
  cleanup: () => Promise<void>
}

/** A temp OCI layout with a few blobs and a manifest tagged `v1`. */
export async function makeLayout (extra: { bigSize?: number } = {}): Promise<TestLayout> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-origin-'))
  const layout = await OciLayout.create(dir)
  const small = bytes(1000, 1)
  const big = bytes(extra.bigSize ?? 3 * 1024 * 1024, 2)
  const empty = new Uint8Array(0)
  const smallDigest = await layout.writeBlob(small)
  const bigDigest = await layout.writeBlob(big)
  const emptyDigest = await layout.writeBlob(empty)
  const config = await layout.writeJsonBlob({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } }, MediaType.ociConfig)
  const manifest = await layout.writeJsonBlob({
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config,
    layers: [{ mediaType: MediaType.ociLayerTar, digest: bigDigest, size: big.length }]
  }, MediaType.ociManifest)
  await layout.setTag('v1', manifest)
  return {
    dir,
    layout,
    small: { digest: smallDigest, data: small },
    big: { digest: bigDigest, data: big },
    empty: { digest: emptyDigest, data: empty },
    manifest,
    cleanup: () => rm(dir, { recursive: true, force: true })
  }
}

export interface RawResponse {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

/**
 * One HTTP request with the path sent byte for byte (fetch would normalize
 * `/../` and percent-escapes away before the server ever saw them).
 */
export function raw (baseUrl: string, path: string, options: { method?: string, headers?: Record<string, string> } = {}): Promise<RawResponse> {
  const url = new URL(baseUrl)
  return new Promise((resolve, reject) => {
    const req = request({ host: url.hostname, port: url.port, path, method: options.method ?? 'GET', headers: options.headers, agent: false }, res => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
}

export interface TestServer {
  url: string
  close: () => Promise<void>
}

/** A throwaway node:http server on 127.0.0.1 with an arbitrary handler. */
export async function testServer (handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<TestServer> {
  const server = createServer(handler)
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise<void>(resolve => {
      server.close(() => resolve())
      server.closeAllConnections()
    })
  }
}

/** Resolves when CONDITION holds, polling on timers (for "the server has seen N requests"). */
export async function until (condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise(resolve => setTimeout(resolve, 2))
}
