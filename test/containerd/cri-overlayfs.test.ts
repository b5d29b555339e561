import assert from 'node:assert/strict'
import { readdir, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { startContainerd, shimsOf, mountsBelow, type Containerd } from '../helpers/containerd/containerd.ts'
import { pushSandboxImage } from '../helpers/containerd/sandbox-image.ts'
import { tempDir } from '../helpers/tmp.ts'
import { skopeoCopy, startRegistry, type TestRegistry } from '../registry/helpers.ts'

/**
 * The baseline the shoal snapshotter is measured against: a real containerd 1.6
 * with its CRI plugin and its own overlayfs snapshotter pulls the python image
 * from a local docker-registry and runs a pod (host network, our own pause image)
 * the way a kubelet does.
 */

const dir = await tempDir('shoal-cri-')

describe('containerd CRI with the overlayfs snapshotter', () => {
  let registry: TestRegistry | undefined
  let containerd: Containerd | undefined
  let image: string
  let sandboxImage: string

  // The first run builds the image fixtures (debootstrap), which takes a few minutes.
  before(async () => {
    const fixtures = await ensureRealFixtures()
    registry = await startRegistry({ dir: join(dir, 'registry') })
    image = `${registry.host}/python:3`
    await skopeoCopy(fixtures.ref('python'), `docker://${image}`)
    sandboxImage = await pushSandboxImage(registry.host, join(dir, 'pause'))
    containerd = await startContainerd({ dir: join(dir, 'containerd'), sandboxImage, registryHosts: [registry.host], keep: process.env.SHOAL_KEEP_TMP === '1' })
  }, { timeout: 900_000 })

  after(async () => {
    const errors: unknown[] = []
    const socket = containerd?.socket
    const containerdDir = containerd?.dir
    await containerd?.stop().catch(err => { errors.push(err) })
    await registry?.stop().catch(err => { errors.push(err) })
    if (socket !== undefined) assert.deepEqual(await shimsOf(socket), [], 'shims of our containerd are left')
    if (containerdDir !== undefined) assert.deepEqual(await mountsBelow(containerdDir), [], 'mounts are left')
    if (errors.length > 0) throw new AggregateError(errors, 'teardown failed')
  }, { timeout: 120_000 })

  test('a pod runs python3 from the pulled image: stdout 42, exit 0', { timeout: 300_000 }, async () => {
    const version = await containerd!.criClient.version()
    assert.equal(version.runtimeName, 'containerd')

    const result = await containerd!.runPod({
      image,
      command: ['python3', '-c', 'import json, sqlite3; print(42)'],
      exitTimeoutMs: 60_000
    })
    const context = `stderr: ${result.stderr}\nreason: ${result.reason} ${result.message}\n${await containerd!.logTail(20)}`
    assert.equal(result.exitCode, 0, context)
    assert.equal(result.stdout, '42\n', context)
    assert.equal(result.stderr, '', context)
    assert.ok(result.timings.pullMs > 0)
    process.stderr.write(`# timings (ms): ${JSON.stringify(Object.fromEntries(Object.entries(result.timings).map(([k, v]) => [k, Math.round(v)])))}\n`)

    // The image stays in the runtime's store; the pod and its container are gone.
    const status = await containerd!.criClient.imageStatus(image)
    assert.ok(status !== undefined, 'ImageStatus does not know the pulled image')
    assert.ok(status.repoTags.includes(image), `repo tags: ${status.repoTags.join(', ')}`)
    assert.equal(await containerd!.criClient.containerStatus(result.containerId).then(() => 'found', () => 'gone'), 'gone')
    assert.ok((await containerd!.criClient.listImages()).some(listed => listed.id === status.id))
    await containerd!.criClient.removeImage(image)
    assert.equal(await containerd!.criClient.imageStatus(image), undefined)
  })

  test('stop() while a pod runs: no shim, container process, mount or directory is left', { timeout: 300_000 }, async () => {
    const second = await startContainerd({ dir: join(dir, 'containerd-2'), sandboxImage, registryHosts: [registry!.host] })
    const marker = `shoal-stop-test-${process.pid}-${Date.now()}`
    const aborted = new AbortController()
    const running = second.runPod({ image, command: ['python3', '-c', `import time; time.sleep(600)  # ${marker}`], signal: aborted.signal, exitTimeoutMs: 300_000 })
    running.catch(() => {})
    try {
      const deadline = Date.now() + 120_000
      while ((await processesWith(marker)).length === 0) {
        assert.ok(Date.now() < deadline, `the pod did not start within 120 s\n${await second.logTail()}`)
        await new Promise(resolve => setTimeout(resolve, 100))
      }
      assert.equal((await shimsOf(second.socket)).length, 1)
      assert.ok((await mountsBelow(second.dir)).length > 0, 'the running pod has no rootfs mount below the containerd dir')
    } finally {
      await second.stop()
      aborted.abort()
    }
    await assert.rejects(running)
    assert.deepEqual(await shimsOf(second.socket), [])
    assert.deepEqual(await processesWith(marker), [])
    assert.deepEqual(await mountsBelow(second.dir), [])
    await assert.rejects(stat(second.dir), { code: 'ENOENT' })
  })
})

/** pids of processes whose command line contains TEXT. */
async function processesWith (text: string): Promise<number[]> {
  const pids: number[] = []
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')
    if (cmdline.includes(text)) pids.push(Number(name))
  }
  return pids
}
