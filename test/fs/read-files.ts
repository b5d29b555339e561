/**
 * Child process for the FUSE tests: reads every path given (a JSON array in
 * argv[2]) concurrently, and prints a JSON array of { path, sha256 } or
 * { path, code } (the errno name of a failed read). Reading the mount from a
 * separate process keeps the test process, which serves the mount, from ever
 * waiting on itself.
 */
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'

// libuv reads this when the thread pool first starts (the first readFile below):
// with the default 4 threads, only 4 reads would be in flight at once.
process.env.UV_THREADPOOL_SIZE = '128'

const paths = JSON.parse(process.argv[2] ?? '[]') as string[]
const results = await Promise.all(paths.map(async path => {
  try {
    return { path, sha256: `sha256:${createHash('sha256').update(await readFile(path)).digest('hex')}` }
  } catch (err) {
    return { path, code: (err as NodeJS.ErrnoException).code ?? String(err) }
  }
}))
process.stdout.write(JSON.stringify(results))
