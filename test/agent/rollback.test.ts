/**
 * Rollback and tag substitution through Agent.mount (issue 15 item 4): a tag pointed
 * back at an older signed version of its name is refused by an agent that saw the
 * newer one, after a restart too; an image signed for another name is refused under
 * this one. An agent that never saw the name mounts the same image: the refusal is
 * the record's doing, not the image's.
 */
import assert from 'node:assert/strict'
import { generateKeyPairSync } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Agent } from '../../src/agent/agent.ts'
import { defaultConfig, validateConfig } from '../../src/agent/config.ts'
import { convertImage } from '../../src/convert/convert.ts'
import { SignatureError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { RollbackError, SIGNED_VERSIONS_FILE } from '../../src/image/rollback-guard.ts'
import { OciLayout } from '../../src/oci/layout.ts'
import type { Descriptor } from '../../src/oci/types.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'

// At the top level: a temp dir made in a hook is removed when the hook ends.
const dir = await tempDir()

describe('agent: signed names and versions', () => {
  let images: string
  let pub: string
  let older: Descriptor
  let newer: Descriptor
  let other: Descriptor

  before(async () => {
    images = join(dir, 'images')
    const keys = generateKeyPairSync('ed25519')
    pub = join(dir, 'shoal.pub')
    await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
    const convert = async (content: string, tag: string, signing: { names: string[], version: number }): Promise<Descriptor> => {
      const src = await buildSyntheticImage(join(dir, `src-${tag}`), 's', [[{ type: 'file', path: 'hello', content }]])
      await convertImage({ source: src.ref, dest: `oci:${images}:${tag}`, signingKey: keys.privateKey, signing })
      return await (await OciLayout.open(images)).resolveTag(tag)
    }
    older = await convert('old\n', 'app', { names: ['app'], version: 100 })
    newer = await convert('new\n', 'app', { names: ['app'], version: 200 })
    other = await convert('other\n', 'other', { names: ['other'], version: 300 })
  })
  after(async () => {
    for (const a of running) await a.stop().catch(() => {})
  })

  const running: Agent[] = []
  async function start (state: string): Promise<Agent> {
    const config = validateConfig({ ...defaultConfig(join(dir, state)), origins: [images], trust: [pub], metrics: '', p2p: { enabled: false, listen: [], peers: [] } })
    const agent = await Agent.start(config, { control: false })
    running.push(agent)
    return agent
  }
  async function mountRead (agent: Agent, image: string): Promise<string> {
    const mnt = join(dir, `mnt-${Math.random().toString(36).slice(2)}`)
    await agent.mount(image, mnt)
    try { return await readFile(join(mnt, 'hello'), 'utf8') } finally { await agent.umount(mnt) }
  }
  const pointAppAt = async (desc: Descriptor): Promise<void> => { await (await OciLayout.open(images)).setTag('app', desc) }

  it('refuses a tag pointed back at an older version of its name, also after a restart', async () => {
    let agent = await start('state-a')
    await pointAppAt(newer)
    assert.equal(await mountRead(agent, 'app'), 'new\n')
    await pointAppAt(older)
    await assert.rejects(agent.mount('app', join(dir, 'mnt-refused')),
      (err: unknown) => err instanceof RollbackError && /app: the image sha256:\w+ is signed as version 100, older than version 200 .*rollback or a stale mirror/.test(err.message))

    await agent.stop()
    agent = await start('state-a')
    await assert.rejects(agent.mount('app', join(dir, 'mnt-refused')), RollbackError)
    const record = JSON.parse(await readFile(join(dir, 'state-a', SIGNED_VERSIONS_FILE), 'utf8')) as { names: Record<string, { version: number, manifest: Digest }> }
    assert.deepEqual({ version: record.names.app!.version, manifest: record.names.app!.manifest }, { version: 200, manifest: newer.digest })

    // An agent that never saw version 200 mounts version 100.
    assert.equal(await mountRead(await start('state-b'), 'app'), 'old\n')
    // Forward again is fine.
    await pointAppAt(newer)
    assert.equal(await mountRead(agent, 'app'), 'new\n')
  })

  it('refuses an image signed for another name than the tag it is mounted by', async () => {
    const agent = await start('state-c')
    await pointAppAt(other)
    await assert.rejects(agent.mount('app', join(dir, 'mnt-other')),
      (err: unknown) => err instanceof SignatureError && err.message.includes('is signed for other, not for app'))
    assert.equal(await mountRead(agent, 'other'), 'other\n')
    // By digest, a layout origin pins the image itself: accepted.
    assert.equal(await mountRead(agent, other.digest), 'other\n')
    await pointAppAt(newer)
  })
})
