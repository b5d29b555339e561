import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after } from 'node:test'

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
    await rm(dir, { recursive: true, force: true })
  })
  return dir
}
