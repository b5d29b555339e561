/**
 * Child process for the crash test: writes distinct chunks into the disk cache at
 * DIR, eight at a time, printing a line per finished write, until it is killed.
 * SIZE (default 256 KiB) is the chunk size: small ones go to segments.
 */
import { DiskCache } from '../../src/cache/disk-cache.ts'
import { sha256 } from '../../src/oci/digest.ts'
import { bytes } from '../origin/helpers.ts'

const cache = await DiskCache.open({ dir: process.argv[2]!, maxBytes: 1 << 30 })
let next = 0
const writer = async (): Promise<void> => {
  for (;;) {
    const data = bytes(Number(process.argv[3] ?? 256 * 1024), ++next)
    await cache.put(sha256(data), data)
    process.stdout.write('wrote\n')
  }
}
await Promise.all(Array.from({ length: 8 }, writer))
