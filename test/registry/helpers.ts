import { spawn, type ChildProcess } from 'node:child_process'
import { createReadStream } from 'node:fs'
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises'
import { createServer as createHttpServer, request as httpRequest, type IncomingHttpHeaders } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { createServer as createNetServer, type AddressInfo } from 'node:net'
import { join, normalize } from 'node:path'
import { parseRange } from '../../src/origin/server.ts'
import { runTool } from '../helpers/exec.ts'

/**
 * A real registry for tests: Debian's docker-registry (distribution 2.8) on
 * 127.0.0.1, filesystem storage in a temp dir, optionally with TLS, htpasswd
 * basic auth, and blob downloads redirected to another server (its `redirect`
 * storage middleware, the way S3-backed registries send clients to S3).
 */

export interface TlsFiles {
  /** The CA that signed the server certificate: what clients pass as --ca. */
  caFile: string
  certFile: string
  keyFile: string
}

export interface RegistryOptions {
  /** Storage and config go here. */
  dir: string
  tls?: TlsFiles
  /** htpasswd file (bcrypt) for basic auth. */
  htpasswd?: string
  /** Blob GETs and HEADs answer 307 to this base URL (scheme and host only: the middleware drops any path). */
  redirectTo?: string
  /** Keep the registry's access log (what `requests()` returns). */
  accessLog?: boolean
  /** Send notifications (push events) to URL with `Authorization: Bearer TOKEN`, retrying every `backoff` (default 500ms) as the registry does. */
  notifications?: { url: string, token: string, backoff?: string }
}

/** One line of the registry's access log. */
export interface RegistryRequest { method: string, path: string, status: number, userAgent: string }

export interface TestRegistry {
  /** 127.0.0.1:PORT, as in docker://HOST/REPO. */
  host: string
  url: string
  /** The storage root (what a redirect target must serve). */
  storageDir: string
  /** The requests served so far (with `accessLog`; else none). */
  requests: () => RegistryRequest[]
  stop: () => Promise<void>
}

export async function startRegistry (options: RegistryOptions): Promise<TestRegistry> {
  const port = await freePort()
  const storageDir = join(options.dir, 'storage')
  const lines = [
    'version: 0.1',
    `log: { level: error, accesslog: { disabled: ${options.accessLog !== true} } }`,
    'storage:',
    `  filesystem: { rootdirectory: ${JSON.stringify(storageDir)} }`,
    '  maintenance: { uploadpurging: { enabled: false } }',
    '  cache: { blobdescriptor: inmemory }',
    'http:',
    `  addr: 127.0.0.1:${port}`,
    '  secret: shoal-test-secret'
  ]
  if (options.tls !== undefined) lines.push(`  tls: { certificate: ${JSON.stringify(options.tls.certFile)}, key: ${JSON.stringify(options.tls.keyFile)} }`)
  if (options.htpasswd !== undefined) lines.push('auth:', `  htpasswd: { realm: shoal-test, path: ${JSON.stringify(options.htpasswd)} }`)
  if (options.notifications !== undefined) {
    const n = options.notifications
    lines.push('notifications:', '  endpoints:', '    - name: convertd', `      url: ${JSON.stringify(n.url)}`, `      headers: { Authorization: [${JSON.stringify(`Bearer ${n.token}`)}] }`,
      '      timeout: 5s', '      threshold: 3', `      backoff: ${n.backoff ?? '500ms'}`, '      ignore: { actions: [pull] }')
  }
  if (options.redirectTo !== undefined) lines.push('middleware:', '  storage:', '    - name: redirect', `      options: { baseurl: ${JSON.stringify(options.redirectTo)} }`)
  const config = join(options.dir, 'config.yml')
  await mkdir(options.dir, { recursive: true })
  await writeFile(config, lines.join('\n') + '\n')

  const child = spawn('/usr/bin/docker-registry', ['serve', config], { stdio: ['ignore', options.accessLog === true ? 'pipe' : 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr!.on('data', (c: Buffer) => { stderr += c.toString() })
  // Combined log format on stdout: HOST - - [TIME] "METHOD PATH HTTP/1.1" STATUS BYTES "REFERER" "AGENT"
  let accessLog = ''
  child.stdout?.on('data', (c: Buffer) => { accessLog += c.toString() })
  const requests = (): RegistryRequest[] => accessLog.split('\n').flatMap(line => {
    const m = /"(\w+) (\S+) HTTP\/[\d.]+" (\d+) \S+ "[^"]*" "([^"]*)"/.exec(line)
    return m === null ? [] : [{ method: m[1]!, path: m[2]!, status: Number(m[3]), userAgent: m[4]! }]
  })
  const url = `${options.tls !== undefined ? 'https' : 'http'}://127.0.0.1:${port}`
  const stop = (): Promise<void> => stopChild(child)
  try {
    await waitForV2(url, child, options.tls?.caFile, () => stderr)
  } catch (err) {
    await stop()
    throw err
  }
  return { host: `127.0.0.1:${port}`, url, storageDir, requests, stop }
}

/** Polls /v2/ until the registry answers at all (200, or 401 with auth on). */
async function waitForV2 (url: string, child: ChildProcess, caFile: string | undefined, stderr: () => string): Promise<void> {
  const ca = caFile !== undefined ? await readFile(caFile, 'utf8') : undefined
  const deadline = Date.now() + 15_000
  for (;;) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited with ${child.exitCode}:\n${stderr()}`)
    const status = await new Promise<number | undefined>(resolve => {
      const req = (url.startsWith('https') ? httpsRequest : httpRequest)(`${url}/v2/`, { agent: false, ...(ca !== undefined ? { ca } : {}) }, res => {
        res.resume()
        resolve(res.statusCode)
      })
      req.on('error', () => resolve(undefined))
      req.end()
    })
    if (status === 200 || status === 401) return
    if (Date.now() > deadline) throw new Error(`docker-registry did not answer at ${url}/v2/ within 15 s:\n${stderr()}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

async function stopChild (child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
  await exited
  clearTimeout(timer)
}

export async function freePort (): Promise<number> {
  const server = createNetServer()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise<void>(resolve => server.close(() => resolve()))
  return port
}

/** A throwaway CA and a certificate for 127.0.0.1 and localhost signed by it (openssl). */
export async function makeTlsFiles (dir: string): Promise<TlsFiles> {
  const caFile = join(dir, 'ca.pem')
  const caKey = join(dir, 'ca.key')
  const keyFile = join(dir, 'server.key')
  const csr = join(dir, 'server.csr')
  const certFile = join(dir, 'server.pem')
  const ext = join(dir, 'server.ext')
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
  await runTool('openssl', ['req', '-x509', ...ec, '-keyout', caKey, '-out', caFile, '-days', '2', '-subj', '/CN=shoal test CA'])
  await runTool('openssl', ['req', ...ec, '-keyout', keyFile, '-out', csr, '-subj', '/CN=127.0.0.1'])
  await writeFile(ext, 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n')
  await runTool('openssl', ['x509', '-req', '-in', csr, '-CA', caFile, '-CAkey', caKey, '-CAcreateserial', '-out', certFile, '-days', '2', '-extfile', ext])
  return { caFile, certFile, keyFile }
}

/** An htpasswd file with one bcrypt entry (what docker-registry requires). */
export async function makeHtpasswd (dir: string, user: string, password: string): Promise<string> {
  const file = join(dir, 'htpasswd')
  const { stdout } = await runTool('htpasswd', ['-Bbn', user, password])
  await writeFile(file, stdout)
  return file
}

export interface StorageServer {
  url: string
  /** The request headers of every request, to check that no Authorization arrived. */
  seen: IncomingHttpHeaders[]
  close: () => Promise<void>
}

/** Serves ROOT's files with Range support: the "object store" a redirecting registry sends clients to. */
export async function startStorageServer (root: string): Promise<StorageServer> {
  const seen: IncomingHttpHeaders[] = []
  const server = createHttpServer((req, res) => {
    seen.push(req.headers)
    const path = normalize(join(root, decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname)))
    if (!path.startsWith(root)) { res.writeHead(403).end(); return }
    stat(path).then(info => {
      const range = parseRange(req.headers.range, info.size)
      if (range === 'unsatisfiable') { res.writeHead(416, { 'Content-Range': `bytes */${info.size}` }).end(); return }
      const { start, end } = range ?? { start: 0, end: info.size - 1 }
      res.writeHead(range !== undefined ? 206 : 200, {
        'Content-Length': String(end - start + 1),
        ...(range !== undefined ? { 'Content-Range': `bytes ${start}-${end}/${info.size}` } : {})
      })
      if (req.method === 'HEAD' || end < start) res.end()
      else createReadStream(path, { start, end }).pipe(res)
    }, () => { res.writeHead(404).end() })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    close: () => new Promise<void>(resolve => { server.close(() => resolve()); server.closeAllConnections() })
  }
}

/** skopeo copy into or out of a test registry (TLS not verified by skopeo: the test checks shoal's TLS, not skopeo's). */
export async function skopeoCopy (from: string, to: string, options: { creds?: string, format?: 'oci' | 'v2s2' } = {}): Promise<void> {
  const args = ['copy', '-q', '--src-tls-verify=false', '--dest-tls-verify=false']
  if (options.creds !== undefined) args.push('--dest-creds', options.creds)
  if (options.format !== undefined) args.push('--format', options.format)
  await runTool('skopeo', [...args, from, to])
}
