/**
 * Debian's docker-registry (distribution 2.8) on 127.0.0.1 with filesystem storage
 * in a temp dir: the baseline a node pulls a whole image from.
 */
import { createServer, type AddressInfo } from 'node:net'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { startDaemon, waitFor, type Daemon } from './proc.ts'

export interface Registry { daemon: Daemon, port: number, address: string }

/** A free TCP port on 127.0.0.1 (closed again; a small race we accept on a test machine). */
export async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(0, '127.0.0.1', () => resolve()) })
  const port = (server.address() as AddressInfo).port
  await new Promise<void>(resolve => server.close(() => resolve()))
  return port
}

export async function startRegistry (dir: string): Promise<Registry> {
  await mkdir(join(dir, 'data'), { recursive: true })
  const port = await freePort()
  const config = join(dir, 'config.yml')
  await writeFile(config, [
    'version: 0.1',
    'log:',
    '  level: error',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${join(dir, 'data')}`,
    'http:',
    `  addr: 127.0.0.1:${port}`,
    ''
  ].join('\n'))
  // Quiet: it logs every 404 of a HEAD probe (skopeo asking whether a blob exists) at level error.
  const daemon = startDaemon('registry', 'docker-registry', ['serve', config], { quiet: true })
  const address = `127.0.0.1:${port}`
  try {
    await waitFor('docker-registry answering /v2/', async () => {
      if (daemon.child.exitCode !== null) throw new Error(`docker-registry exited with ${daemon.child.exitCode}`)
      return await fetch(`http://${address}/v2/`, { signal: AbortSignal.timeout(2_000) }).then(r => r.ok, () => false)
    }, 30_000, 100)
  } catch (err) {
    await daemon.stop()
    throw err
  }
  return { daemon, port, address }
}
