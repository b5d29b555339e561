import { execFile } from 'node:child_process'

/** mkfifo(1): Node has no mkfifo of its own. */
export async function mkfifo (path: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    execFile('mkfifo', [path], { timeout: 10_000 }, err => { if (err === null) resolve(); else reject(err) })
  })
}
