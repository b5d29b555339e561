/**
 * Builds the bundle src/p2p/libp2p.ts loads: src/p2p/libp2p-packages.ts and everything
 * it imports, as one ES module, so that an agent with peers starts without resolving
 * libp2p's ~1,000 modules one by one.
 *
 *   node scripts/bundle-libp2p.ts      (npm run build:libp2p; scripts/setup.sh runs it)
 *
 * Prints one line: the bundle's path, its size and the time taken.
 */
import { statSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'

const root = resolve(import.meta.dirname, '..')
/** The same path as LIBP2P_BUNDLE in src/p2p/libp2p.ts (test/p2p/libp2p-bundle.test.ts checks). */
export const bundlePath = join(root, 'node_modules', '.cache', 'shoal', 'libp2p.mjs')

export async function bundleLibp2p (): Promise<void> {
  const started = performance.now()
  const { build } = await import('esbuild')
  await build({
    entryPoints: [join(root, 'src', 'p2p', 'libp2p-packages.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    outfile: bundlePath,
    absWorkingDir: root, // the same output from any directory (its comments name source paths)
    logLevel: 'warning',
    // esbuild's ES output has no `require`: a CommonJS dependency that requires one of Node's own
    // modules would throw "Dynamic require of ... is not supported" (none does today; cheap insurance).
    banner: { js: "import { createRequire as __shoalRequire } from 'node:module'; const require = __shoalRequire(import.meta.url);" }
  })
  const ms = performance.now() - started
  process.stdout.write(`bundle-libp2p: ${relative(process.cwd(), bundlePath)}, ${(statSync(bundlePath).size / 1e6).toFixed(2)} MB, ${ms.toFixed(0)} ms\n`)
}

if (import.meta.main) await bundleLibp2p()
