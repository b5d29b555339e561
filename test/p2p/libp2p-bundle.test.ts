/**
 * The libp2p bundle (src/p2p/libp2p.ts): src/ takes the libp2p family's values only
 * through it, it loads the bundle only when fresh, and the bundle has every value.
 */
import assert from 'node:assert/strict'
import { readdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'
import { test } from 'node:test'
import { bundleIsFresh, LIBP2P_BUNDLE, LIBP2P_BUNDLE_SOURCES, loadLibp2p } from '../../src/p2p/libp2p.ts'
import { bundlePath } from '../../scripts/bundle-libp2p.ts'
import { tempDir } from '../helpers/tmp.ts'

const repo = resolve(import.meta.dirname, '../..')
const PACKAGES = join(repo, 'src/p2p/libp2p-packages.ts')
const FAMILY = /^(libp2p$|libp2p\/|@libp2p\/|@chainsafe\/|it-|@multiformats\/|multiformats($|\/)|uint8arr|protons)/

/**
 * The modules a source file loads at run time: static imports and re-exports (all
 * but `import type` / `export type`, which are erased; `import { type A }` is not:
 * it still loads the module) and dynamic imports (not `typeof import(...)`).
 */
function runtimeImports (text: string): string[] {
  const statics = [...text.matchAll(/(?:^|[;}\n])\s*(?:import|export)\s+(?!type[\s{*])(?:[^;'"]*?\bfrom\s*)?['"]([^'"]+)['"]/g)]
  const dynamics = [...text.matchAll(/(?<!typeof\s+)\bimport\s*\(\s*['"]([^'"]+)['"]/g)]
  return [...statics, ...dynamics].map(m => m[1]!)
}

test('libp2p bundle: the import check sees run-time imports of the libp2p family, not type imports', () => {
  const flagged = (text: string): string[] => runtimeImports(text).filter(s => FAMILY.test(s))
  assert.deepEqual(flagged("import { multiaddr } from '@multiformats/multiaddr'\n"), ['@multiformats/multiaddr'])
  assert.deepEqual(flagged("import {\n  pipe\n} from 'it-pipe'\nimport { type Libp2p } from 'libp2p'\nexport { CID } from 'multiformats/cid'\nimport 'uint8arraylist'\n"), ['it-pipe', 'libp2p', 'multiformats/cid', 'uint8arraylist'])
  assert.deepEqual(flagged("const m = await import('@libp2p/tcp')\n"), ['@libp2p/tcp'])
  assert.deepEqual(flagged("import type { Libp2p } from 'libp2p'\nimport type { PeerId } from '@libp2p/interface'\ntype T = typeof import('libp2p')\nimport { x } from './libp2p.ts'\nimport { y } from 'libp2p-like'\n"), [])
})

test('libp2p bundle: no file in src/ but libp2p-packages.ts imports a run-time value from the libp2p family', () => {
  const src = join(repo, 'src')
  const broken: string[] = []
  let files = 0
  for (const entry of readdirSync(src, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith('.ts')) continue
    const file = join(entry.parentPath, entry.name)
    if (file === PACKAGES) continue
    files++
    for (const spec of runtimeImports(readFileSync(file, 'utf8'))) {
      if (FAMILY.test(spec)) broken.push(`${relative(repo, file)} imports '${spec}'`)
    }
  }
  assert.ok(files > 50, `expected the files of src/, found ${files}`)
  assert.deepEqual(broken, [], 'add the value to src/p2p/libp2p-packages.ts and src/p2p/libp2p.ts, and import it from src/p2p/libp2p.ts (types: `import type` from the package)')
})

test('libp2p bundle: the loader takes the bundle only when it is newer than every source', async () => {
  const dir = await tempDir()
  const bundle = join(dir, 'bundle.mjs')
  const sources = [join(dir, 'libp2p-packages.ts'), join(dir, 'package-lock.json')]
  for (const s of sources) writeFileSync(s, '')
  const at = (file: string, seconds: number): void => { utimesSync(file, seconds, seconds) }
  const isBundle = (m: object): boolean => 'marker' in m
  const isPackages = (m: object): boolean => !('marker' in m) && typeof (m as { createLibp2p?: unknown }).createLibp2p === 'function'

  assert.ok(isPackages(await loadLibp2p(bundle, sources)), 'no bundle: the packages')
  writeFileSync(bundle, "export const marker = 'bundle'\n")
  at(sources[0]!, 1000); at(sources[1]!, 1000); at(bundle, 2000)
  assert.ok(isBundle(await loadLibp2p(bundle, sources)), 'newer than both: the bundle')
  at(sources[1]!, 3000)
  assert.ok(isPackages(await loadLibp2p(bundle, sources)), 'older than package-lock.json: the packages')
  at(sources[1]!, 1000); at(sources[0]!, 3000)
  assert.ok(isPackages(await loadLibp2p(bundle, sources)), 'older than libp2p-packages.ts: the packages')
  at(sources[0]!, 2000)
  assert.ok(isPackages(await loadLibp2p(bundle, sources)), 'as old as a source: the packages')
  assert.ok(isPackages(await loadLibp2p(bundle, [...sources, join(dir, 'missing')])), 'a source missing: the packages')
})

test('libp2p bundle: the real bundle, if built and fresh, exports every value libp2p-packages.ts does', async t => {
  assert.equal(bundlePath, LIBP2P_BUNDLE, 'scripts/bundle-libp2p.ts writes where src/p2p/libp2p.ts looks')
  assert.deepEqual(LIBP2P_BUNDLE_SOURCES, [PACKAGES, join(repo, 'package-lock.json')])
  if (!bundleIsFresh(LIBP2P_BUNDLE, LIBP2P_BUNDLE_SOURCES)) {
    t.skip(`no fresh bundle at ${relative(repo, LIBP2P_BUNDLE)} (npm run build:libp2p)`)
    return
  }
  const bundle = await import(LIBP2P_BUNDLE) as Record<string, unknown>
  const packages = await import(PACKAGES) as Record<string, unknown>
  assert.deepEqual(Object.keys(bundle).sort(), Object.keys(packages).sort())
  for (const [name, value] of Object.entries(packages)) assert.equal(typeof bundle[name], typeof value, name)
})
