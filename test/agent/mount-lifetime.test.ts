import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { it } from 'node:test'
import { promisify } from 'node:util'
import { Agent } from '../../src/agent/agent.ts'
import { defaultConfig, validateConfig } from '../../src/agent/config.ts'
import { sha256 } from '../../src/oci/digest.ts'
import { isFuseMount } from '../../src/fs/stale-mount.ts'
import { tempDir } from '../helpers/tmp.ts'
import { helloImage } from './helpers.ts'

const execFileAsync = promisify(execFile)

/** An in-process agent (no control socket; peer-to-peer on loopback if asked) whose origin holds image `t`: one file, `hello`. */
async function startAgentWithImage (options: { p2p?: boolean } = {}): Promise<{ dir: string, agent: Agent }> {
  const dir = await tempDir()
  const { images, pub } = await helloImage(dir)
  const config = validateConfig({ ...defaultConfig(join(dir, 'state')), origins: [images], trust: [pub], metrics: '', p2p: { enabled: options.p2p === true, listen: ['/ip4/127.0.0.1/tcp/0'], peers: [] } })
  return { dir, agent: await Agent.start(config, { control: false }) }
}

it('a mount outlives the signal that bounded its set-up', async () => {
  const { dir, agent } = await startAgentWithImage()
  const mnt = join(dir, 'mnt')
  try {
    await agent.mount('t', mnt, { signal: AbortSignal.timeout(300) })
    await new Promise(resolve => setTimeout(resolve, 800))
    assert.ok(await isFuseMount(mnt), 'still mounted after the set-up signal fired')
    // Read from another process: this one serves the mount.
    assert.equal((await execFileAsync('cat', [join(mnt, 'hello')])).stdout, 'world\n')
  } finally {
    await agent.stop()
  }
  assert.equal(await isFuseMount(mnt), false)
})

it('a chunk a peer asks for before this node knows it is located as soon as a mount learns it', async () => {
  // The chunk index says what a node may serve to peers: an agent without peers keeps none.
  const { dir, agent } = await startAgentWithImage({ p2p: true })
  const hello = sha256(Buffer.from('world\n'))
  try {
    assert.equal(agent.index.locate(hello), undefined)
    assert.equal(await agent.index.locateSoon(hello, AbortSignal.timeout(50)), undefined, 'gives up when its signal fires')
    const waiting = agent.index.locateSoon(hello, AbortSignal.timeout(30_000))
    await agent.mount('t', join(dir, 'mnt'))
    assert.equal((await waiting)?.digest, hello)
  } finally {
    await agent.stop()
  }
})
