/**
 * containerd's filter language (github.com/containerd/containerd/filters), for
 * List. A filter is selectors joined by `,` that must all match:
 * `<fieldpath>[<op><value>]`, fieldpath `field(.field)*` where a field is
 * `[A-Za-z0-9_]+` or a double-quoted Go string, op `==`, `!=` or `~=` (regexp),
 * value a Go string or a run of characters up to `,` or a space. A bare fieldpath
 * tests presence. Several filters match if any does.
 *
 * Fields of a snapshot: `name`, `parent`, `kind` (`active`, `view`, `committed`)
 * and `labels.<key>` (a key with dots or slashes is quoted:
 * `labels."containerd.io/snapshot.ref"==sha256:...`).
 *
 * containerd filters the answer again itself, so a filter this parser does not
 * understand is reported as `undefined` and the caller lists everything: too much
 * is harmless, an error would break containerd's pull.
 */
import { kindName, type SnapshotInfo } from './types.ts'

export type SnapshotFilter = (info: SnapshotInfo) => boolean

/** A predicate for FILTERS (any of them), or undefined if one of them cannot be parsed. */
export function parseFilters (filters: string[]): SnapshotFilter | undefined {
  const parsed: SnapshotFilter[] = []
  for (const filter of filters) {
    try {
      parsed.push(parseFilter(filter))
    } catch (err) {
      if (err instanceof FilterSyntaxError) return undefined
      throw err
    }
  }
  if (parsed.length === 0) return () => true
  return info => parsed.some(matches => matches(info))
}

class FilterSyntaxError extends Error {}

type Operator = 'present' | '==' | '!=' | '~='
interface Selector { path: string[], operator: Operator, value: string, pattern?: RegExp }

function parseFilter (input: string): SnapshotFilter {
  if (input === '') return () => true
  const selectors = new Parser(input).selectors()
  return info => selectors.every(selector => matchSelector(selector, info))
}

function matchSelector (selector: Selector, info: SnapshotInfo): boolean {
  const [value, present] = fieldOf(info, selector.path)
  switch (selector.operator) {
    case 'present': return present
    case '==': return present && value === selector.value
    case '!=': return value !== selector.value
    case '~=': return selector.pattern!.test(value)
  }
}

/** The adaptor of containerd's snapshot storage: a field's value and whether it is present. */
function fieldOf (info: SnapshotInfo, path: string[]): [string, boolean] {
  switch (path[0]) {
    case 'kind': return [kindName(info.kind), true]
    case 'name': return [info.name, true]
    case 'parent': return [info.parent, true]
    case 'labels': {
      const key = path.slice(1).join('.')
      return Object.hasOwn(info.labels, key) ? [info.labels[key]!, true] : ['', false]
    }
    default: return ['', false]
  }
}

const FIELD = /[A-Za-z0-9_]/
const SPACE = /\s/

class Parser {
  private pos = 0
  private readonly input: string

  constructor (input: string) { this.input = input }

  selectors (): Selector[] {
    const selectors = [this.selector()]
    for (;;) {
      this.skipSpace()
      if (this.atEnd()) return selectors
      if (this.input[this.pos] !== ',') this.fail('expected ","')
      this.pos++
      selectors.push(this.selector())
    }
  }

  private selector (): Selector {
    const path = this.fieldpath()
    this.skipSpace()
    if (this.atEnd() || this.input[this.pos] === ',') return { path, operator: 'present', value: '' }
    const operator = this.operator()
    const value = this.value(operator === '~=')
    if (operator !== '~=') return { path, operator, value }
    let pattern: RegExp
    try {
      pattern = new RegExp(value)
    } catch {
      this.fail(`regular expression ${value} is not understood`)
    }
    return { path, operator, value, pattern }
  }

  private fieldpath (): string[] {
    const path = [this.field()]
    for (;;) {
      this.skipSpace()
      if (this.input[this.pos] !== '.') return path
      this.pos++
      path.push(this.field())
    }
  }

  private field (): string {
    this.skipSpace()
    if (this.input[this.pos] === '"') return this.quoted('"')
    const start = this.pos
    while (!this.atEnd() && FIELD.test(this.input[this.pos]!)) this.pos++
    if (this.pos === start) this.fail('expected a field name')
    return this.input.slice(start, this.pos)
  }

  private operator (): Operator {
    this.skipSpace()
    const start = this.pos
    while (!this.atEnd() && '=!~'.includes(this.input[this.pos]!)) this.pos++
    const operator = this.input.slice(start, this.pos)
    if (operator !== '==' && operator !== '!=' && operator !== '~=') this.fail('expected "==", "!=" or "~="')
    return operator
  }

  private value (regexp: boolean): string {
    this.skipSpace()
    const first = this.input[this.pos]
    if (first === '"') return this.quoted('"')
    // `/re/` and `|re|` quote regular expressions only.
    if (first === '/' || first === '|') {
      if (!regexp) this.fail(`${first} quotes only a regular expression (~=)`)
      return this.quoted(first)
    }
    if (first === undefined || ',.=!~'.includes(first)) this.fail('expected a value')
    const start = this.pos
    while (!this.atEnd() && this.input[this.pos] !== ',' && !SPACE.test(this.input[this.pos]!)) this.pos++
    return this.input.slice(start, this.pos)
  }

  /** A quoted string from QUOTE to QUOTE with Go's escapes, unquoted. */
  private quoted (quote: string): string {
    this.pos++
    let out = ''
    for (;;) {
      if (this.atEnd() || this.input[this.pos] === '\n') this.fail('unterminated quoted string')
      const ch = this.input[this.pos++]!
      if (ch === quote) return out
      if (ch !== '\\') { out += ch; continue }
      out += this.escape(quote)
    }
  }

  private escape (quote: string): string {
    const ch = this.input[this.pos++]
    const simple: Record<string, string> = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v', '\\': '\\' }
    if (ch === undefined) this.fail('unterminated escape')
    if (ch === quote) return quote
    if (simple[ch] !== undefined) return simple[ch]
    const digits = (count: number, radix: number): string => {
      const text = this.input.slice(this.pos, this.pos + count)
      const pattern = radix === 8 ? /^[0-7]+$/ : /^[0-9a-fA-F]+$/
      if (text.length !== count || !pattern.test(text)) this.fail('bad numeric escape')
      this.pos += count
      const code = parseInt(text, radix)
      if (code > 0x10ffff) this.fail('escape beyond Unicode')
      return String.fromCodePoint(code)
    }
    if (ch >= '0' && ch <= '7') { this.pos--; return digits(3, 8) }
    if (ch === 'x') return digits(2, 16)
    if (ch === 'u') return digits(4, 16)
    if (ch === 'U') return digits(8, 16)
    this.fail(`illegal escape \\${ch}`)
  }

  private skipSpace (): void {
    while (!this.atEnd() && SPACE.test(this.input[this.pos]!)) this.pos++
  }

  private atEnd (): boolean { return this.pos >= this.input.length }

  private fail (message: string): never {
    throw new FilterSyntaxError(`filter ${JSON.stringify(this.input)} at ${this.pos}: ${message}`)
  }
}
