import { createPublicKey } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { Agent } from '../../agent/agent.ts'
import { defaultConfig, validateConfig } from '../../agent/config.ts'
import { UsageError } from '../../errors.ts'
import { parseShoalConfig } from '../../format/image-config.ts'
import { loadPrivateKey, parseLifetime } from '../../format/signing.ts'
import { loadImage } from '../../image/load-image.ts'
import { DirOrigin } from '../../origin/dir-origin.ts'
import { ReadRecorder } from '../../image/prefetch-list.ts'
import { writeSignedImage } from '../../image/write-image.ts'
import { OciLayout } from '../../oci/layout.ts'
import { parseReference } from '../../oci/reference.ts'
import type { ImageManifest } from '../../oci/types.ts'
import { runContainer } from '../../run/run-container.ts'
import { mib } from '../output.ts'
import type { TraceFlags } from './trace.ts'

/** `shoal trace`'s action, loaded only when the command runs (see trace.ts). */
export async function traceAction (image: string, command: string[], flags: TraceFlags): Promise<void> {
  const lifetimeMs = flags.expires !== undefined ? parseLifetime(flags.expires) : undefined
  const ref = parseReference(image)
  if (ref.transport !== 'oci') throw new UsageError(`${image}: trace works on a local layout, oci:DIR:TAG`)
  const key = await loadPrivateKey(flags.key)
  const state = await mkdtemp(join(tmpdir(), 'shoal-trace-'))
  const controller = new AbortController()
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => controller.abort())
  const recorder = new ReadRecorder()
  let code = 1
  try {
    // The image must carry a signature by the key that will sign the new version.
    const pub = join(state, 'signer.pub')
    await writeFile(pub, createPublicKey(key).export({ type: 'spki', format: 'pem' }))
    const config = validateConfig({ ...defaultConfig(join(state, 'agent')), origins: [ref.dir], trust: [pub], metrics: '', p2p: { enabled: false, listen: [], peers: [] } })
    const agent = await Agent.start(config, { control: false, log: pino({ name: 'shoal-trace', level: 'warn' }, pino.destination(2)) })
    try {
      const mountpoint = join(state, 'mnt')
      const info = await agent.mount(ref.tag, mountpoint, { signal: controller.signal, onRead: recorder.record })
      try {
        code = await runContainer({ lowerDir: mountpoint, runtime: info.runtime, args: command, signal: controller.signal, ...(flags.runtime !== undefined ? { use: flags.runtime } : {}) })
      } finally {
        await agent.umount(mountpoint)
      }
    } finally {
      await agent.stop()
    }
  } finally {
    await rm(state, { recursive: true, force: true })
  }
  if (code !== 0) throw new UsageError(`the command exited with ${code}; no prefetch list written (trace a command that succeeds)`)

  const layout = await OciLayout.open(ref.dir)
  const manifest = await layout.readJson<ImageManifest>((await layout.resolveTag(ref.tag)).digest, 'manifest')
  const entries = recorder.entries()
  const newConfig = { ...parseShoalConfig(await layout.readBlob(manifest.config.digest, 'config')), prefetch: entries }
  // The new version is signed for the same names (and the new tag), with a higher version.
  const old = (await loadImage(await DirOrigin.open(ref.dir), ref.tag, { trusted: [createPublicKey(key)], image })).signature!
  const names = [...old.names, ...(flags.tag !== undefined ? [flags.tag] : [])]
  const version = Math.max(Math.floor(Date.now() / 1000), old.version + 1)
  const desc = await writeSignedImage(layout, flags.tag ?? ref.tag, newConfig, key, { names, version, ...(lifetimeMs !== undefined ? { lifetimeMs } : {}) })
  const bytes = entries.reduce((n, e) => n + (e.ranges ?? []).reduce((m, [, len]) => m + len, 0), 0)
  console.log(`recorded ${entries.length} files, ${mib(bytes)} read; oci:${ref.dir}:${flags.tag ?? ref.tag} is now ${desc.digest}`)
}
