/**
 * How the scripts beside the product (simulations/, benchmarks/, scripts/) end on an
 * error, as the `shoal` command does (src/cli/main.ts): one line on stderr,
 * `SCRIPT: what happened` and what to do, never Node's stack trace.
 *
 * A script calls `reportErrors('NAME')` first thing (before parseScriptArgs, see args.ts);
 * from then on an error escaping its body (a top-level await that rejects, a throw, an
 * 'error' event nobody listened to) ends it so (an error while its imports load, before
 * the call, is still Node's report):
 *
 * - A ShoalError (src/errors.ts): its message (and its cause's when that adds
 *   something); exit 2 for a UsageError (the user must
 *   change what they gave: a scenario file, a results directory), else 1. Scripts throw
 *   these for the mistakes they expect (simulations/lib/scenario.ts's ScenarioError,
 *   requireRoot below).
 * - A failed system call (ENOENT, EACCES...): its message and to check the path; exit 1.
 * - Any other Error: its message, with its cause's when that adds something; exit 1. In
 *   these scripts `throw new Error('...')` is how a step says what went wrong, so the
 *   message is for people (unlike in src/, where only ShoalErrors are).
 * - A bug: a TypeError, RangeError, ReferenceError, SyntaxError (JSON.parse's included:
 *   a file the user gives is read with readJsonFile below), EvalError, URIError or
 *   failed assertion without a cause, or a thrown value that is not an Error: its
 *   message, where it was thrown (the first frame in our own sources) and how to see
 *   the whole trace; exit 1. Like the product, not the stack itself: that is for whoever
 *   fixes the bug, and one variable away. (A TypeError with a cause, such as fetch's
 *   "fetch failed" over ECONNREFUSED, is a failure, not a bug: its message and cause.)
 *
 * SHOAL_DEBUG=1 (the product's variable) adds the whole error, stack and cause, to any of them.
 */
import { readFile } from 'node:fs/promises'
import { relative, resolve } from 'node:path'
import { inspect } from 'node:util'
import { ShoalError, UsageError } from '../../src/errors.ts'
import { errorOrigin, oneLine } from '../../src/util/error-line.ts'

const REPO = resolve(import.meta.dirname, '../..')

/**
 * From now on, an error nothing catches ends this process with one line, `SCRIPT: ...`
 * (see above), as src/cli/main.ts does for `shoal`: through 'uncaughtException' and
 * 'unhandledRejection', which a top-level await that rejects reaches too, so the
 * script's body needs no wrapping.
 */
export function reportErrors (script: string): void {
  const fail = (err: unknown): never => {
    const { line, exitCode } = describeFailure(script, err)
    process.stderr.write(`${line}\n`)
    if (process.env.SHOAL_DEBUG === '1') process.stderr.write(`${inspect(err)}\n`)
    process.exit(exitCode)
  }
  process.on('uncaughtException', fail)
  process.on('unhandledRejection', fail)
}

const BUGS = [TypeError, RangeError, ReferenceError, SyntaxError, EvalError, URIError]

/** The line `reportErrors` prints for ERR, and the exit code. */
export function describeFailure (script: string, err: unknown): { line: string, exitCode: number } {
  if (err instanceof ShoalError) return { line: `${script}: ${oneLine(withCause(err))}`, exitCode: err.code === 'EUSAGE' ? 2 : 1 }
  const e = err instanceof Error ? err : undefined
  const system = e as NodeJS.ErrnoException | undefined
  if (system?.syscall !== undefined) {
    return { line: `${script}: ${oneLine(system.message)}; check the path, that it exists and its permissions (SHOAL_DEBUG=1 shows where it failed)`, exitCode: 1 }
  }
  const bug = e === undefined || (e.cause === undefined && (BUGS.some(B => e instanceof B) || e.name === 'AssertionError'))
  if (!bug) return { line: `${script}: ${oneLine(withCause(e))}${system?.code !== undefined && !e.message.includes(String(system.code)) ? ` (${system.code})` : ''}`, exitCode: 1 }
  const message = e !== undefined ? `${e.name}: ${e.message}${system?.code !== undefined ? ` (${system.code})` : ''}` : `thrown: ${inspect(err)}`
  const at = errorOrigin(e?.stack, REPO)
  return { line: `${script}: ${oneLine(message)}; this is a bug${at !== undefined ? ` (at ${at})` : ''}: rerun with SHOAL_DEBUG=1 for the whole trace`, exitCode: 1 }
}

/**
 * Throws unless the script runs as root. WHY says what needs it (`mounts, chroot and
 * drop_caches`); the message gives the command to run instead.
 */
export function requireRoot (why: string): void {
  if (process.getuid?.() !== 0) throw new ShoalError('EROOT', `must run as root (${why} need it): sudo ${commandLine()}`)
}

/**
 * A JSON file the user named (a scenario, a results file): its parsed contents, or a
 * UsageError that names the file and says what is wrong with it. WHAT names the kind
 * (`scenario file`); HINT, if any, says what to give instead when the file does not exist.
 */
export async function readJsonFile (path: string, what: string, hint?: () => string): Promise<unknown> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new UsageError(`${what} ${path} does not exist${hint !== undefined ? ` (${hint()})` : ''}`)
    throw new UsageError(`cannot read ${what} ${path}: ${(err as Error).message}`)
  }
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new UsageError(`${what} ${path} is not valid JSON (${(err as Error).message}); fix it or give another`)
  }
}

/** This process's command line as it could be typed again (the script relative to the current directory when it is below it). */
function commandLine (): string {
  const quote = (arg: string): string => /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", "'\\''")}'`
  const script = process.argv[1] ?? ''
  const near = relative(process.cwd(), script)
  return ['node', near.startsWith('..') ? script : near, ...process.argv.slice(2)].map(quote).join(' ')
}

/** MESSAGE, and ERR's cause's when it is not already in it. */
function withCause (err: Error): string {
  const cause = err.cause instanceof Error ? err.cause.message : typeof err.cause === 'string' ? err.cause : undefined
  return cause === undefined || cause === '' || err.message.includes(cause) ? err.message : `${err.message} (${cause})`
}
