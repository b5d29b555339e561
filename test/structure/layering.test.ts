/**
 * The layering rule of docs/ARCHITECTURE.md ("Layers"): every import in src/ goes to
 * its own folder or to a folder in a lower layer, never outside src/. The table is read
 * from the document, so the rule written there is the rule checked here.
 */
import assert from 'node:assert/strict'
import { readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { test } from 'node:test'

const repo = resolve(import.meta.dirname, '../..')
const src = join(repo, 'src')

function layerTable (): Map<string, number> {
  const doc = readFileSync(join(repo, 'docs/ARCHITECTURE.md'), 'utf8')
  const block = /<!-- layers: begin -->([\s\S]*?)<!-- layers: end -->/.exec(doc)?.[1]
  assert.ok(block !== undefined, 'docs/ARCHITECTURE.md has no layers table')
  const layers = new Map<string, number>()
  for (const m of block.matchAll(/^\|\s*(\d+)\s*\|([^|]+)\|/gm)) {
    for (const folder of m[2]!.split(',').map(f => f.trim()).filter(f => f !== '')) layers.set(folder, Number(m[1]))
  }
  return layers
}

/** Every relative import (static, re-export or dynamic) of every .ts file under src/. */
function imports (): Array<{ file: string, target: string }> {
  const found: Array<{ file: string, target: string }> = []
  for (const entry of readdirSync(src, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith('.ts')) continue
    const file = join(entry.parentPath, entry.name)
    const text = readFileSync(file, 'utf8')
    for (const m of text.matchAll(/(?:\bfrom\s+|\bimport\s*\(\s*|\bimport\s+)'(\.{1,2}\/[^']+)'/g)) {
      found.push({ file, target: resolve(dirname(file), m[1]!) })
    }
  }
  return found
}

/** The top folder under src/ a path is in ('' for a file at src/'s top). */
function folderOf (path: string): string {
  const parts = relative(src, path).split(sep)
  return parts.length > 1 ? parts[0]! : ''
}

test('layering: the table names every folder under src/', () => {
  const layers = layerTable()
  const folders = readdirSync(src, { withFileTypes: true }).filter(e => e.isDirectory()).map(e => e.name)
  const missing = folders.filter(f => !layers.has(f))
  assert.deepEqual(missing, [], `add ${missing.join(', ')} to the layers table in docs/ARCHITECTURE.md`)
})

test('layering: every import in src/ goes to its own folder or a lower layer, never outside src/', () => {
  const layers = layerTable()
  const found = imports()
  assert.ok(found.length > 100, `expected the imports of src/, found ${found.length}`)
  const broken: string[] = []
  for (const { file, target } of found) {
    const where = relative(repo, file)
    if (relative(src, target).startsWith('..')) {
      broken.push(`${where} imports ${relative(repo, target)}, outside src/`)
      continue
    }
    const from = folderOf(file)
    const to = folderOf(target)
    if (to === '' || from === to) continue // src/errors.ts is shared by all; a folder's own files
    const a = layers.get(from)
    const b = layers.get(to)
    if (a === undefined || b === undefined) continue // reported by the test above
    if (b >= a) broken.push(`${where} (${from}, layer ${a}) imports ${relative(repo, target)} (${to}, layer ${b})`)
  }
  assert.deepEqual(broken, [], 'imports that break the layering of docs/ARCHITECTURE.md ("Layers"): move the shared code down a layer, or the interface into a file of its own')
})
