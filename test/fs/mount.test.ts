/**
 * Real FUSE mounts of real converted images, read from child processes (the test
 * process serves the mount, so it must not wait on it itself, except for the
 * one-at-a-time async walk of snapshotDisk).
 */
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { lstat, mkdir, open, readFile, stat, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, it } from 'node:test'
import { Catalog } from '../../src/format/catalog.ts'
import { mountImage } from '../../src/fs/mount.ts'
import { cleanStaleMount, isFuseMount } from '../../src/fs/stale-mount.ts'
import { MergedView } from '../../src/image/merged-view.ts'
import { digestHex, sha256 } from '../../src/oci/digest.ts'
import { HttpOrigin } from '../../src/origin/http-origin.ts'
import { startOriginServer } from '../../src/origin/server.ts'
import { testServer } from '../origin/helpers.ts'
import { runTool } from '../helpers/exec.ts'
import { standardSyntheticLayers } from '../helpers/standard-layers.ts'
import { contentBytes, type GeneratedContent, type SyntheticEntry } from '../helpers/synthetic.ts'
import { tempDir } from '../helpers/tmp.ts'
import { diffSnapshots, snapshotDisk } from '../helpers/tree-snapshot.ts'
import { umociUnpack } from '../helpers/umoci.ts'
import { convertSynthetic, distinctChunks, openReadStack, readInChild, withMount, type ReadResult } from './helpers.ts'

const MiB = 1024 * 1024

function codeOf (results: ReadResult[], path: string): string | undefined {
  const r = results.find(x => x.path === path)
  return r !== undefined && 'code' in r ? r.code : undefined
}

function digestOf (results: ReadResult[], path: string): string | undefined {
  const r = results.find(x => x.path === path)
  return r !== undefined && 'sha256' in r ? r.sha256 : undefined
}

describe('FUSE mount', () => {
  it('shows exactly what umoci unpacks: tree, modes, owners, mtimes, xattrs, content, hard links', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    await umociUnpack(image.source.ref.replace(/^oci:/, ''), join(dir, 'bundle'))
    const expected = await snapshotDisk(join(dir, 'bundle', 'rootfs'), { mtimes: true })

    const server = await startOriginServer({ dir: image.layoutDir })
    const stack = await openReadStack(dir, image, { origin: new HttpOrigin(server.url) })
    const mnt = join(dir, 'mnt')
    try {
      await withMount(stack, mnt, async () => {
        const actual = await snapshotDisk(mnt, { mtimes: true })
        assert.deepEqual(diffSnapshots(expected, actual), [])
        // The snapshot groups hard links by st_ino; check the numbers directly too.
        const [hl2, hl3, alias, tool, hostname] = await Promise.all(['data/hl-2', 'data/hl-3', 'usr/bin/setuid-alias', 'usr/bin/setuid-tool', 'etc/hostname'].map(p => lstat(join(mnt, p))))
        assert.equal(hl2!.ino, hl3!.ino)
        assert.equal(alias!.ino, tool!.ino)
        assert.notEqual(hl2!.ino, alias!.ino)
        assert.notEqual(hostname!.ino, alias!.ino)
        assert.equal(hostname!.blocks, Math.ceil(hostname!.size / 512))
      })
    } finally {
      stack.close()
      await server.close()
    }
    assert.equal(await isFuseMount(mnt), false, 'unmounted afterwards')
  })

  it('is read-only (EROFS) and sizes xattr answers to the caller\'s buffer', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const stack = await openReadStack(dir, image)
    const mnt = join(dir, 'mnt')
    try {
      await withMount(stack, mnt, async () => {
        // Writes are refused by the kernel (the mount is `ro`): no FUSE request, no risk of waiting on ourselves.
        await assert.rejects(writeFile(join(mnt, 'etc/hostname'), 'x'), { code: 'EROFS' })
        await assert.rejects(writeFile(join(mnt, 'new-file'), 'x'), { code: 'EROFS' })
        await assert.rejects(mkdir(join(mnt, 'new-dir')), { code: 'EROFS' })
        await assert.rejects(unlink(join(mnt, 'etc/hostname')), { code: 'EROFS' })
        await assert.rejects(runTool('setfattr', ['-n', 'user.x', '-v', '1', join(mnt, 'etc/hostname')]), /Read-only file system/)

        // getxattr(2) with a buffer of 0, exactly, and too few bytes for the 20-byte capability.
        const probe = [
          'import ctypes, os, sys',
          'libc = ctypes.CDLL(None, use_errno=True)',
          'path, name = sys.argv[1].encode(), b"security.capability"',
          'for size in (0, 20, 8):',
          '    buf = ctypes.create_string_buffer(max(size, 1))',
          '    n = libc.getxattr(path, name, buf if size else None, size)',
          '    print(n, os.strerror(ctypes.get_errno()) if n < 0 else buf.raw[:n].hex() if size else "")',
          'n = libc.getxattr(path, b"user.missing", None, 0)',
          'print(n, os.strerror(ctypes.get_errno()))'
        ].join('\n')
        const { stdout } = await runTool('python3', ['-c', probe, join(mnt, 'usr/bin/cap-tool')])
        assert.deepEqual(stdout.trim().split('\n'), [
          '20 ',
          '20 0100000280200000000000000000000000000000',
          '-1 Numerical result out of range',
          '-1 No data available'
        ])
      })
    } finally {
      stack.close()
    }
  })

  it('reads its catalogs into memory at mount: walks and reads go on with the catalog files overwritten on disk', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const stack = await openReadStack(dir, image)
    // What the image holds, listed through the stack's own connections before anything is damaged.
    const expected = [...stack.view.walk()].map(([path]) => path.slice(1)).filter(p => p !== '').sort()
    const walk = async (mnt: string): Promise<string[]> => (await runTool('find', [mnt, '-mindepth', '1', '-printf', '%P\n'])).stdout.trim().split('\n').sort()
    const paths = stack.view.catalogs.map(c => c.path)
    const originals = await Promise.all(paths.map(async p => await readFile(p)))
    const overwrite = async (): Promise<void> => {
      for (const p of paths) {
        const file = await open(p, 'r+')
        try { await file.write(Buffer.alloc((await file.stat()).size)) } finally { await file.close() }
      }
    }
    const restore = async (): Promise<void> => { for (const [i, p] of paths.entries()) await writeFile(p, originals[i]!) }
    try {
      for (const preload of [true, false]) {
        const view = new MergedView(paths.map(p => new Catalog(p)))
        const mnt = join(dir, preload ? 'mnt-preloaded' : 'mnt-on-demand')
        const mount = await mountImage({ mountpoint: mnt, view, resolver: stack.resolver, ...(preload ? {} : { preloadCatalogBytes: 0 }) })
        try {
          await overwrite()
          if (preload) {
            assert.deepEqual(await walk(mnt), expected)
            const [result] = await readInChild([join(mnt, 'usr/lib/big.bin')])
            assert.equal(digestOf([result!], result!.path), sha256(contentBytes({ size: 3.5 * MiB + 3, seed: 'big' })))
          } else {
            // The control: read on demand, the damaged files fail the walk.
            await assert.rejects(walk(mnt))
          }
        } finally {
          await mount.unmount()
          for (const c of view.catalogs) c.close()
          await restore()
        }
      }
    } finally {
      stack.close()
    }
  })

  it('is lazy: reading one file fetches only its own chunks', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const stack = await openReadStack(dir, image)
    const mnt = join(dir, 'mnt')
    try {
      const extents = stack.view.extents(stack.view.resolve('/usr/lib/big.bin')!)
      const chunks = distinctChunks(extents)
      const storedBytes = extents.reduce((n, e) => n + e.storedLength, 0)
      const packBytes = stack.view.catalogs.flatMap(c => c.packs()).reduce((n, p) => n + p.size, 0)
      assert.ok(packBytes > 2 * storedBytes, 'the image holds much more than the file')

      await withMount(stack, mnt, async () => {
        const [result] = await readInChild([join(mnt, 'usr/lib/big.bin')])
        assert.equal(digestOf([result!], result!.path), sha256(contentBytes({ size: 3.5 * MiB + 3, seed: 'big' })))
      })
      assert.equal(stack.resolver.stats.sources.origin!.chunks, chunks.size)
      assert.equal(stack.disk.stats.chunks, chunks.size)
      // Merged range requests may carry gaps of at most 64 KiB each, never other files wholesale.
      assert.ok(stack.ranges.stats.bytesFetched <= storedBytes + stack.ranges.stats.requests * 64 * 1024)
    } finally {
      stack.close()
    }
  })

  it('gives EIO for a file whose chunk is corrupt at the origin, and serves the rest', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const stack = await openReadStack(dir, image, { attempts: 2 })
    const mnt = join(dir, 'mnt')
    try {
      const [victim] = stack.view.extents(stack.view.resolve('/usr/lib/exact-1mib.bin')!)
      const pack = await open(join(image.layoutDir, 'blobs', 'sha256', digestHex(victim!.pack)), 'r+')
      try {
        const at = victim!.packOffset + 100
        const byte = Buffer.alloc(1)
        await pack.read(byte, 0, 1, at)
        byte[0]! ^= 0xff
        await pack.write(byte, 0, 1, at)
      } finally {
        await pack.close()
      }

      await withMount(stack, mnt, async () => {
        const paths = ['usr/lib/exact-1mib.bin', 'usr/lib/big.bin', 'etc/hostname'].map(p => join(mnt, p))
        const results = await readInChild(paths)
        assert.equal(codeOf(results, paths[0]!), 'EIO')
        assert.equal(digestOf(results, paths[1]!), sha256(contentBytes({ size: 3.5 * MiB + 3, seed: 'big' })))
        assert.equal(digestOf(results, paths[2]!), sha256(Buffer.from('shoal-synthetic\n')))
      })
      assert.ok(stack.resolver.stats.verificationFailures.origin! >= 2, 'counted once per attempt')
      assert.equal(stack.disk.has(victim!.digest), false, 'bad bytes never reach the cache')
    } finally {
      stack.close()
    }
  })

  it('keeps serving cached data while the origin is down, fails the rest with EIO, and recovers', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    let server = await startOriginServer({ dir: image.layoutDir })
    const port = server.port
    // No retries inside the origin client: the resolver's timeout and attempts are what is under test.
    const origin = new HttpOrigin(server.url, { retries: 0, requestTimeoutMs: 1000 })
    const stack = await openReadStack(dir, image, { origin, timeoutMs: 1500 })
    const mnt = join(dir, 'mnt')
    const warm = join(mnt, 'usr/lib/big.bin')
    const cold = join(mnt, 'usr/lib/exact-1mib.bin')
    try {
      await withMount(stack, mnt, async () => {
        assert.ok(digestOf(await readInChild([warm]), warm))
      })
      await server.close()
      // A fresh resolver (empty memory cache) on the same disk cache, and a fresh
      // mount (empty page cache): the warm file must come from the disk cache.
      const again = await openReadStack(join(dir, 'again'), image, { origin, timeoutMs: 1500, disk: stack.disk })
      try {
        await withMount(again, mnt, async () => {
          const results = await readInChild([warm, cold], { timeoutMs: 20_000 })
          assert.equal(digestOf(results, warm), sha256(contentBytes({ size: 3.5 * MiB + 3, seed: 'big' })))
          // EIO from the resolver, not ETIMEDOUT from fuse-native's backstop or a hang.
          assert.equal(codeOf(results, cold), 'EIO')
          assert.ok(again.resolver.stats.unavailable >= 1)
          assert.equal(again.resolver.stats.sources.origin!.chunks, 0)

          server = await startOriginServer({ dir: image.layoutDir, port })
          assert.equal(digestOf(await readInChild([cold]), cold), sha256(contentBytes({ size: MiB, seed: 'exact-1mib' })))
        })
      } finally {
        again.close()
      }
    } finally {
      stack.close()
      await server.close()
    }
  })

  it('fails a read waiting on an origin that never answers with EIO at the resolver\'s timeout', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const silent = await testServer(() => {}) // accepts requests, never responds
    const stack = await openReadStack(dir, image, { origin: new HttpOrigin(silent.url, { retries: 0, requestTimeoutMs: 60_000 }), timeoutMs: 1000, attempts: 1 })
    const mnt = join(dir, 'mnt')
    try {
      await withMount(stack, mnt, async () => {
        const path = join(mnt, 'etc/hostname')
        // fuse-native's own deadline would answer ETIMEDOUT only after 6 s; the child gives up at 15 s.
        assert.equal(codeOf(await readInChild([path], { timeoutMs: 15_000 }), path), 'EIO')
      })
      // The kernel retries a failed readahead page once, synchronously: two resolutions, two timeouts.
      assert.ok(stack.resolver.stats.unavailable >= 1)
    } finally {
      stack.close()
      await silent.close()
    }
  })

  it('serves 200 concurrent readers of the same and of different files, fetching each chunk once', async () => {
    const dir = await tempDir()
    const contents: Array<string | GeneratedContent> = [
      ...Array.from({ length: 10 }, (_, i) => ({ size: 2.5 * MiB + i, seed: `big-${i}` })),
      ...Array.from({ length: 20 }, (_, i) => ({ size: 10_000 + i * 4000, seed: `small-${i}` })),
      'a short text file\n'
    ]
    const entries: SyntheticEntry[] = [{ type: 'dir', path: 'files' }, ...contents.map((content, i): SyntheticEntry => ({ type: 'file', path: `files/f${i}`, content }))]
    const image = await convertSynthetic(dir, [entries])
    const stack = await openReadStack(dir, image)
    const mnt = join(dir, 'mnt')
    try {
      const chunks = new Set(contents.flatMap((_, i) => [...distinctChunks(stack.view.extents(stack.view.resolve(`/files/f${i}`)!))]))
      await withMount(stack, mnt, async () => {
        // Readers 0-99 all read f0 (a 3-chunk file); 100-199 spread over every file.
        const order = Array.from({ length: 200 }, (_, i) => i < 100 ? 0 : i % contents.length)
        const results = await readInChild(order.map(i => join(mnt, `files/f${i}`)))
        assert.equal(results.length, 200)
        for (const [k, i] of order.entries()) {
          assert.deepEqual(results[k], { path: join(mnt, `files/f${i}`), sha256: sha256(contentBytes(contents[i]!)) })
        }
      })
      assert.equal(stack.resolver.stats.sources.origin!.chunks, chunks.size, 'each chunk came from the origin once')
      assert.equal(stack.resolver.stats.unavailable, 0)
    } finally {
      stack.close()
    }
  })

  it('replaces the dead mount of a killed agent', async () => {
    const dir = await tempDir()
    const image = await convertSynthetic(dir, standardSyntheticLayers())
    const mnt = join(dir, 'mnt')
    // A separate process mounts the image and is killed without unmounting.
    const child = spawn(process.execPath, [fileURLToPath(new URL('./mount-child.ts', import.meta.url)), join(dir, 'child'), image.layoutDir, image.tag, mnt], { stdio: ['ignore', 'pipe', 'inherit'] })
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (data: Buffer) => { if (data.toString().includes('mounted')) resolve() })
        child.once('exit', code => reject(new Error(`mount child exited early (${code})`)))
      })
    } finally {
      child.kill('SIGKILL')
    }
    await new Promise(resolve => child.once('exit', resolve))
    await assert.rejects(stat(mnt), { code: 'ENOTCONN' })

    const stack = await openReadStack(dir, image)
    try {
      assert.equal(await cleanStaleMount(mnt), true)
      assert.equal(await isFuseMount(mnt), false)
      assert.equal(await cleanStaleMount(mnt), false, 'nothing left to clean')
      await withMount(stack, mnt, async () => {
        assert.equal(digestOf(await readInChild([join(mnt, 'etc/hostname')]), join(mnt, 'etc/hostname')), sha256(Buffer.from('shoal-synthetic\n')))
      })
    } finally {
      stack.close()
    }
  })
})
