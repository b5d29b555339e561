/**
 * Each layer mounted alone as an overlayfs lower directory (what the containerd
 * snapshotter stacks), then stacked by the kernel's overlayfs: the result must be
 * exactly what umoci unpacks, whiteouts and opaque directories included.
 */
import assert from 'node:assert/strict'
import { lstat, mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { Catalog } from '../../src/format/catalog.ts'
import { mountImage, type MountedImage } from '../../src/fs/mount.ts'
import { MergedView } from '../../src/image/merged-view.ts'
import { runTool } from '../helpers/exec.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk } from '../helpers/tree-snapshot.ts'
import { umociUnpack } from '../helpers/umoci.ts'
import { convertSynthetic, openReadStack } from './helpers.ts'

describe('a layer as an overlayfs lower directory', () => {
  it('shows whiteouts as 0/0 character devices and opaque directories by xattr; overlayfs stacks the layers into what umoci unpacks', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    await umociUnpack(image.source.ref.replace(/^oci:/, ''), join(dir, 'bundle'))
    const expected = await snapshotDisk(join(dir, 'bundle', 'rootfs'), { mtimes: true })

    const stack = await openReadStack(dir, image)
    const mounts: MountedImage[] = []
    const merged = join(dir, 'merged')
    let overlay = false
    try {
      const lowers: string[] = []
      for (const [i, catalog] of stack.view.catalogs.entries()) {
        const mnt = join(dir, `layer-${i}`)
        mounts.push(await mountImage({ mountpoint: mnt, view: new MergedView([new Catalog(catalog.path)], { overlayLower: true }), resolver: stack.resolver }))
        lowers.unshift(mnt)
      }
      // Layer 2 whites out etc/remove-me and makes opt/app opaque.
      const whiteout = await lstat(join(dir, 'layer-1', 'etc', 'remove-me'))
      assert.ok(whiteout.isCharacterDevice())
      assert.equal(whiteout.rdev, 0)
      const { stdout } = await runTool('getfattr', ['--only-values', '-n', 'trusted.overlay.opaque', join(dir, 'layer-1', 'opt', 'app')])
      assert.equal(stdout, 'y')

      await mkdir(merged)
      await runTool('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowers.join(':')}`, merged])
      overlay = true
      const actual = await snapshotDisk(merged, { mtimes: true })
      assert.deepEqual(diffSnapshots(expected, actual), [])
    } finally {
      if (overlay) await runTool('umount', [merged])
      for (const m of mounts) await m.unmount()
      stack.close()
    }
  })
})
