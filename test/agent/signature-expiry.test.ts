/**
 * A signature that expires while its image is mounted (issue 15;
 * src/image/signature-expiry.ts has the decision): the mount keeps serving, files
 * not read before included (their chunks verified against the root taken at
 * mount); the agent flags it (stats, `shoal ls`/`stats` through MountInfo, the
 * metrics gauge) and warns; a new mount of the image is refused, by this agent
 * and by a restarted one.
 */
import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, it } from 'node:test'
import { Agent } from '../../src/agent/agent.ts'
import { defaultConfig, validateConfig } from '../../src/agent/config.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { SignatureError } from '../../src/errors.ts'
import { DEFAULT_CLOCK_SKEW_MS } from '../../src/format/signing-defaults.ts'
import { sleep } from '../../src/util/limit.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

const dir = await tempDir()
/** The signature is refused (and the mount flagged) this long after the test signs it. */
const VALID_MS = 4000

const running: Agent[] = []
after(async () => { for (const a of running) await a.stop().catch(() => {}) })

async function start (state: string, images: string, pub: string): Promise<Agent> {
  const config = validateConfig({ ...defaultConfig(join(dir, state)), origins: [images], trust: [pub], metrics: '127.0.0.1:0', p2p: { enabled: false, listen: [], peers: [] } })
  const agent = await Agent.start(config, { control: false })
  running.push(agent)
  return agent
}

it('a mount whose signature expires keeps serving, is flagged, and the image does not mount again', { timeout: 60_000 }, async () => {
  const keys = generateKeyPairSync('ed25519')
  const pub = join(dir, 'shoal.pub')
  await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
  const src = await buildSyntheticImage(join(dir, 'src'), 's', [[
    { type: 'file', path: 'early', content: 'read before expiry\n' },
    { type: 'file', path: 'late', content: 'read after expiry\n' }
  ]])
  const images = join(dir, 'images')
  // Signed in the past so that, with the clock skew agents allow, it is refused VALID_MS from now.
  await convertImage({ source: src.ref, dest: `oci:${images}:app`, signingKey: keys.privateKey, signing: { names: ['app'], lifetimeMs: VALID_MS, now: Date.now() - DEFAULT_CLOCK_SKEW_MS } })

  const agent = await start('state', images, pub)
  const mnt = join(dir, 'mnt')
  const mounted = await agent.mount('app', mnt)
  assert.equal(mounted.signature.expired, false)
  assert.ok(mounted.signature.expires !== null)
  assert.equal(await readFile(join(mnt, 'early'), 'utf8'), 'read before expiry\n')

  await sleep(VALID_MS + 500)
  const [info] = agent.list()
  assert.equal(info!.signature.expired, true, 'the mount is flagged')
  assert.equal(agent.stats().mounts[0]!.signature.expired, true, 'shoal stats shows it')
  const metrics = await (await fetch(`${agent.stats().metricsUrl!}`)).text()
  assert.match(metrics, /^shoal_mounts_signature_expired 1$/m)
  // Still served, also what was never read before: its chunks are verified against the root taken at mount.
  assert.equal(await readFile(join(mnt, 'late'), 'utf8'), 'read after expiry\n')

  await assert.rejects(agent.mount('app', join(dir, 'mnt-again')), (err: unknown) => err instanceof SignatureError && /expired on .*shoal sign/.test(err.message))
  await agent.umount(mnt)
  await agent.stop()
  const restarted = await start('state', images, pub)
  await assert.rejects(restarted.mount('app', mnt), (err: unknown) => err instanceof SignatureError && /expired/.test(err.message))
})
