import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after } from 'node:test'
import { runTool } from './exec.ts'

/**
 * A fresh directory under os.tmpdir(), removed by a node:test `after` hook: when the
 * test that asked for it ends, or, if asked at a file's top level, when the file's
 * tests are done. Set SHOAL_KEEP_TMP=1 to keep it for a post-mortem (its path is printed).
 */
export async function tempDir (prefix = 'shoal-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix))
  after(async () => {
    if (process.env.SHOAL_KEEP_TMP === '1') {
      process.stderr.write(`kept temp dir ${dir}\n`)
      return
    }
    await removeDir(dir)
  })
  return dir
}

/**
 * Removes DIR after lazily unmounting whatever is still mounted below it (a FUSE
 * mount of a killed agent, an overlay of a failed run): a leaked mount would make
 * rm fail and break the next run.
 */
export async function removeDir (dir: string): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  const below = mountinfo.split('\n').map(line => line.split(' ')[4]).filter((p): p is string => p !== undefined && (p === dir || p.startsWith(dir + '/')))
  for (const mountpoint of below.sort().reverse()) {
    await runTool('umount', ['-l', mountpoint], { timeoutMs: 10_000 }).catch(() => {})
  }
  await rm(dir, { recursive: true, force: true })
}
