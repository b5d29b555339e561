/**
 * Command-line options of the scripts beside the product (simulations/, benchmarks/,
 * scripts/): node:util parseArgs, answering mistakes as the `shoal` command does.
 *
 * - `--help`/`-h`: the script's usage on stdout, exit 0.
 * - An unknown option, an option without its value (or a value given to a flag), or
 *   the wrong number of arguments: `SCRIPT: what is wrong` and the usage on stderr,
 *   exit 2, before the script has set anything up. Never Node's stack trace.
 * - `int`/`number` read an option as a number in a range, failing the same way
 *   (`model: --nodes must be an integer from 1 to 100000, got "abc"`).
 */
import { parseArgs, type ParseArgsOptionsConfig } from 'node:util'

export interface ScriptArgsSpec<O extends ParseArgsOptionsConfig> {
  /** The name errors start with, e.g. `model` for simulations/model.ts. */
  script: string
  /** `usage: node DIR/SCRIPT.ts ...`, and any lines that explain it. */
  usage: string
  options: O
  /** How many arguments besides the options: an exact count, or at least `min` (default: none). */
  positionals?: number | { min: number }
  /** `--no-FLAG` sets a boolean option to false. */
  allowNegative?: boolean
  /** Default: process.argv.slice(2). */
  args?: string[]
}

type Values<O extends ParseArgsOptionsConfig> = ReturnType<typeof parseArgs<{ options: O, strict: true, allowPositionals: true }>>['values']
/** The options whose value is a string (the ones a number can be read from). */
type StringOption<O extends ParseArgsOptionsConfig> = { [K in keyof O & string]: O[K]['type'] extends 'string' ? (O[K]['multiple'] extends true ? never : K) : never }[keyof O & string]
/** A number for an option that always has a value (it has a default), else number | undefined. */
type NumberOf<D extends { default?: unknown }> = D extends { default: string } ? number : number | undefined

export interface Range { min?: number, max?: number }

export interface ScriptArgs<O extends ParseArgsOptionsConfig> {
  values: Values<O>
  positionals: string[]
  /** Option NAME as an integer in RANGE; undefined when it was not given and has no default. */
  int: <K extends StringOption<O>>(name: K, range?: Range) => NumberOf<O[K]>
  /** Option NAME as a finite number in RANGE; undefined when it was not given and has no default. */
  number: <K extends StringOption<O>>(name: K, range?: Range) => NumberOf<O[K]>
  /** `SCRIPT: MESSAGE` and the usage on stderr, exit 2: for checks of the options' values the script makes itself. */
  fail: (message: string) => never
}

export function parseScriptArgs<const O extends ParseArgsOptionsConfig> (spec: ScriptArgsSpec<O>): ScriptArgs<O> {
  const args = spec.args ?? process.argv.slice(2)
  const usage = spec.usage.endsWith('\n') ? spec.usage : `${spec.usage}\n`
  const fail = (message: string): never => {
    process.stderr.write(`${spec.script}: ${message}\n${usage}`)
    process.exit(2)
  }
  const options: ParseArgsOptionsConfig = { ...spec.options, help: { type: 'boolean', short: 'h' } } // --help is always ours

  // A lenient pass first, so that --help wins over any mistake next to it and each
  // mistake gets a message of its own; then the strict parse for the values.
  const { tokens } = parseArgs({ args, options, strict: false, allowPositionals: true, allowNegative: spec.allowNegative, tokens: true })
  if (tokens.some(t => t.kind === 'option' && t.name === 'help')) {
    process.stdout.write(usage)
    process.exit(0)
  }
  for (const t of tokens) {
    if (t.kind !== 'option') continue
    const type = Object.hasOwn(options, t.name) ? options[t.name]!.type : undefined
    if (type === undefined) fail(`unknown option ${t.rawName}`)
    if (type === 'string' && t.rawName === `--no-${t.name}`) fail(`unknown option ${t.rawName} (--${t.name} takes a value, it is not a flag)`)
    if (type === 'string' && t.value === undefined) fail(`${t.rawName} needs a value`)
    if (type === 'string' && t.inlineValue === false && t.value!.length > 1 && t.value!.startsWith('-')) fail(`${t.rawName} needs a value, got "${t.value}", which looks like an option (write ${t.rawName}=${t.value} if it is the value)`)
    if (type === 'boolean' && t.value !== undefined) fail(`${t.rawName} takes no value, got "${t.value}"`)
  }
  let parsed: { values: Record<string, unknown>, positionals: string[] }
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: true, allowNegative: spec.allowNegative })
  } catch (err) {
    // Anything the checks above let through (they cover every case parseArgs refuses today).
    if (!String((err as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS_')) throw err
    return fail((err as Error).message.replace(/\s*\n\s*/g, ' '))
  }
  const want = spec.positionals ?? 0
  const got = parsed.positionals.length
  if (typeof want === 'number' ? got !== want : got < want.min) {
    const count = (n: number): string => n === 0 ? 'no arguments' : `${n} argument${n === 1 ? '' : 's'}`
    fail(`expected ${typeof want === 'number' ? count(want) : `at least ${count(want.min)}`} besides the options, got ${got === 0 ? 'none' : parsed.positionals.map(p => JSON.stringify(p)).join(' ')}`)
  }

  const read = (integer: boolean) => (name: string, range: Range = {}): number | undefined => {
    const text = parsed.values[name]
    if (text === undefined) return undefined
    const n = typeof text === 'string' && text.trim() !== '' ? Number(text) : NaN
    const { min, max } = range
    if (!(integer ? Number.isInteger(n) : Number.isFinite(n)) || (min !== undefined && n < min) || (max !== undefined && n > max)) {
      const kind = integer ? 'an integer' : 'a number'
      const what = min !== undefined && max !== undefined ? `${kind} from ${min} to ${max}`
        : integer && min === 1 ? 'a positive integer'
          : min !== undefined ? `${kind} >= ${min}` : max !== undefined ? `${kind} <= ${max}` : kind
      fail(`--${name} must be ${what}, got ${JSON.stringify(text)}`)
    }
    return n
  }
  return {
    values: parsed.values as Values<O>,
    positionals: parsed.positionals,
    int: read(true) as ScriptArgs<O>['int'],
    number: read(false) as ScriptArgs<O>['number'],
    fail
  }
}
