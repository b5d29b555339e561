/**
 * One-line error reports, shared by the `shoal` command (src/cli/main.ts) and the
 * scripts beside the product (scripts/lib/errors.ts).
 */
import { relative } from 'node:path'

/** TEXT on one line: every line break, with the blanks around it, becomes one space. */
export function oneLine (text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim()
}

/**
 * Where an error came from: the first frame of STACK in ROOT's own sources (not
 * node_modules), relative to ROOT; else the first frame.
 */
export function errorOrigin (stack: string | undefined, root: string): string | undefined {
  const frames = [...(stack ?? '').matchAll(/\n\s+at (?:.*?\()?(?:file:\/\/)?([^()\n]+?:\d+):\d+\)?/g)].map(m => m[1]!)
  const ours = frames.filter(f => f.startsWith('/')).map(f => relative(root, f)).find(f => !f.startsWith('..') && !f.startsWith('node_modules/'))
  return ours ?? frames[0]
}
