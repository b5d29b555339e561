/**
 * The command lines of the scripts beside the product (simulations/, benchmarks/,
 * scripts/): every one parses its options with scripts/lib/args.ts, so a mistyped
 * option gets `SCRIPT: what is wrong` and the usage (exit 2), and --help the usage
 * (exit 0), never Node's stack trace; and reports what fails after the options with
 * scripts/lib/errors.ts, one line (`SCRIPT: ...`), never a stack trace either. Each
 * case fails in the option parsing or in reading what the script was given (a scenario
 * file, a results directory), or on not being root, before the script sets anything
 * up: nothing here runs a benchmark or a simulation.
 */
import assert from 'node:assert/strict'
import { spawn, spawnSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { join, relative, resolve } from 'node:path'
import { describe, it } from 'node:test'
import { describeFailure } from '../../scripts/lib/errors.ts'
import { UsageError } from '../../src/errors.ts'
import { tempDir } from '../helpers/tmp.ts'

const REPO = resolve(import.meta.dirname, '../..')

/** Every script with a command line, and the name its errors start with. */
const SCRIPTS: Array<{ path: string, name: string }> = [
  'simulations/model.ts', 'simulations/run.ts', 'simulations/calibrate.ts',
  'benchmarks/agent-start.ts', 'benchmarks/agent.ts', 'benchmarks/cached-reads.ts', 'benchmarks/containerd-cold.ts',
  'benchmarks/convert.ts', 'benchmarks/convertd.ts', 'benchmarks/cpu-profiles.ts', 'benchmarks/p2p-mesh.ts',
  'benchmarks/p2p-throughput.ts', 'benchmarks/registry-cold.ts', 'benchmarks/workloads.ts',
  'benchmarks/lib/data-images.ts', 'benchmarks/lib/gcc-image.ts', 'scripts/demo.ts', 'scripts/fixtures/debian-images.ts'
].map(path => ({ path, name: path.replace(/^.*\//, '').replace(/\.ts$/, '') }))

interface Exit { code: number | null, signal: NodeJS.Signals | null, stdout: string, stderr: string }

/** ENV is added to this process's environment, without SHOAL_DEBUG unless ENV sets it; UID runs the script as that user (and group). */
async function runScript (path: string, args: string[], options: { env?: Record<string, string>, uid?: number } = {}): Promise<Exit> {
  const env = { ...process.env, SHOAL_DEBUG: undefined, ...options.env }
  const user = options.uid !== undefined ? { uid: options.uid, gid: options.uid } : {}
  const child = spawn(process.execPath, [join(REPO, path), ...args], { cwd: REPO, env, ...user, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 })
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d })
  child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d })
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
    child.once('error', reject)
    child.once('close', (c, s) => resolve([c, s]))
  })
  return { code, signal, stdout, stderr }
}

/** Exit 2, `NAME: MESSAGE` then the script's usage on stderr, nothing on stdout, no stack trace. */
function assertUsageError (r: Exit, name: string, message: string): void {
  const all = `${r.stdout}${r.stderr}`
  assert.equal(r.code, 2, `exit ${r.code ?? r.signal}; stderr:\n${r.stderr}`)
  assert.equal(r.stderr.split('\n')[0], `${name}: ${message}`)
  assert.match(r.stderr, /\nusage: node \S+\.ts/)
  assert.equal(r.stdout, '')
  assert.doesNotMatch(all, /^\s+at /m, 'no stack trace')
  assert.doesNotMatch(all, /ERR_PARSE_ARGS|TypeError|\bError\b/, 'no raw error')
}

describe('script command lines', { concurrency: 4 }, () => {
  it('every script outside src/ that reads options goes through scripts/lib/args.ts, and is tested here', () => {
    const direct: string[] = []
    const users: string[] = []
    for (const dir of ['simulations', 'benchmarks', 'scripts']) {
      for (const entry of readdirSync(join(REPO, dir), { recursive: true, withFileTypes: true })) {
        if (!entry.isFile() || !entry.name.endsWith('.ts')) continue
        const file = relative(REPO, join(entry.parentPath, entry.name))
        if (file === 'scripts/lib/args.ts') continue
        const text = readFileSync(join(REPO, file), 'utf8')
        if (/\bparseArgs\b/.test(text)) direct.push(file)
        if (/\bparseScriptArgs\(/.test(text)) users.push(file)
      }
    }
    assert.deepEqual(direct, [], 'use parseScriptArgs (scripts/lib/args.ts), not node:util parseArgs')
    assert.deepEqual(users.sort(), SCRIPTS.map(s => s.path).sort(), 'SCRIPTS in this test lists every script')
  })

  for (const { path, name } of SCRIPTS) {
    it(`${path} --bogus-option: exit 2, "${name}: unknown option --bogus-option" and the usage`, async () => {
      assertUsageError(await runScript(path, ['--bogus-option']), name, 'unknown option --bogus-option')
    })
    it(`${path} --help: exit 0, the usage on stdout`, async () => {
      const r = await runScript(path, ['--help'])
      assert.equal(r.code, 0, `exit ${r.code ?? r.signal}; stderr:\n${r.stderr}`)
      assert.ok(r.stdout.startsWith(`usage: node ${path} `), r.stdout)
      assert.equal(r.stderr, '')
    })
  }

  it('-h is --help, and --help wins over a mistake beside it', async () => {
    for (const args of [['-h'], ['--bogus-option', '--help']]) {
      const r = await runScript('benchmarks/convert.ts', args)
      assert.equal(r.code, 0, r.stderr)
      assert.equal(r.stdout, 'usage: node benchmarks/convert.ts [--runs 3]\n')
    }
  })

  it('numbers are checked: not a number, out of range, not an integer', async () => {
    assertUsageError(await runScript('simulations/model.ts', ['simulations/scenarios/NAME.json', '--nodes', 'abc']), 'model', '--nodes must be an integer from 1 to 100000, got "abc"')
    assertUsageError(await runScript('simulations/run.ts', ['simulations/scenarios/NAME.json', '--nodes=0']), 'run', '--nodes must be an integer from 1 to 100000, got "0"')
    assertUsageError(await runScript('benchmarks/p2p-mesh.ts', ['--nodes', '1']), 'p2p-mesh', '--nodes must be an integer >= 2, got "1"')
    assertUsageError(await runScript('benchmarks/p2p-mesh.ts', ['--settle-ms=-5']), 'p2p-mesh', '--settle-ms must be a number >= 0, got "-5"')
    assertUsageError(await runScript('benchmarks/agent-start.ts', ['--runs', '2.5']), 'agent-start', '--runs must be a positive integer, got "2.5"')
    assertUsageError(await runScript('benchmarks/workloads.ts', ['--mbit', '']), 'workloads', '--mbit must be a number from 1 to 100000, got ""')
    assertUsageError(await runScript('scripts/demo.ts', ['--agents', '51']), 'demo', '--agents must be an integer from 1 to 50, got "51"')
  })

  it('values and arguments: missing, given to a flag, looking like an option, too few or too many', async () => {
    assertUsageError(await runScript('simulations/model.ts', ['simulations/scenarios/NAME.json', '--nodes']), 'model', '--nodes needs a value')
    assertUsageError(await runScript('simulations/run.ts', ['simulations/scenarios/NAME.json', '--profile-only=yes']), 'run', '--profile-only takes no value, got "yes"')
    assertUsageError(await runScript('simulations/run.ts', ['simulations/scenarios/NAME.json', '--out', '--profile-only']), 'run',
      '--out needs a value, got "--profile-only", which looks like an option (write --out=--profile-only if it is the value)')
    assertUsageError(await runScript('simulations/model.ts', []), 'model', 'expected 1 argument besides the options, got none')
    assertUsageError(await runScript('simulations/model.ts', ['a.json', 'b.json']), 'model', 'expected 1 argument besides the options, got "a.json" "b.json"')
    assertUsageError(await runScript('simulations/calibrate.ts', ['--fit']), 'calibrate', 'expected at least 1 argument besides the options, got none')
    assertUsageError(await runScript('benchmarks/convert.ts', ['extra']), 'convert', 'expected no arguments besides the options, got "extra"')
    // --no-FLAG negates a flag of cached-reads; an option with a value cannot be negated.
    assertUsageError(await runScript('benchmarks/cached-reads.ts', ['--no-squashfuse', '--bogus-option']), 'cached-reads', 'unknown option --bogus-option')
    assertUsageError(await runScript('benchmarks/cached-reads.ts', ['--no-work']), 'cached-reads', 'unknown option --no-work (--work takes a value, it is not a flag)')
  })

  it('checks a script makes of its own options answer the same way', async () => {
    assertUsageError(await runScript('benchmarks/agent.ts', ['--only', 'cold,foo']), 'agent', '--only: unknown part foo (cold, io, meta)')
    assertUsageError(await runScript('benchmarks/containerd-cold.ts', ['--workloads', 'python,foo']), 'containerd-cold', 'unknown workload foo (python, gcc)')
    assertUsageError(await runScript('scripts/demo.ts', ['--origin-rate', 'lots']), 'demo', '--origin-rate lots: write a size such as 1048576, 1MiB or 16M')
  })
})

/** Exit CODE and one line on stderr, `NAME: ` and then what MESSAGE matches; nothing on stdout, no stack trace. */
function assertFailure (r: Exit, name: string, code: number, message: RegExp): void {
  assert.equal(r.code, code, `exit ${r.code ?? r.signal}; stderr:\n${r.stderr}`)
  const lines = r.stderr.trimEnd().split('\n')
  assert.equal(lines.length, 1, `one line of error, got:\n${r.stderr}`)
  assert.ok(lines[0]!.startsWith(`${name}: `), lines[0])
  assert.match(lines[0]!, message)
  assert.equal(r.stdout, '')
  assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace')
}

const escape = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

describe('script errors after the options', { concurrency: 4 }, () => {
  it('every script with a command line reports its errors with scripts/lib/errors.ts, under its name', () => {
    const missing = SCRIPTS.filter(({ path, name }) => !readFileSync(join(REPO, path), 'utf8').includes(`reportErrors('${name}')`)).map(s => s.path)
    assert.deepEqual(missing, [], 'call reportErrors(NAME) (scripts/lib/errors.ts) before parseScriptArgs')
  })

  for (const script of ['simulations/model.ts', 'simulations/run.ts']) {
    const name = script.replace(/^.*\/|\.ts$/g, '')
    it(`${script}: a scenario file that does not exist, is not JSON, or has a bad field: exit 2, one line naming the file`, async () => {
      const dir = await tempDir('shoal-script-errors-')
      assertFailure(await runScript(script, ['no/such/scenario.json']), name, 2,
        /^\w+: scenario file no\/such\/scenario\.json does not exist \(the scenarios are simulations\/scenarios\/NAME\.json, NAME one of .*\bsmoke\b/)
      const notJson = join(dir, 'not-json.json')
      await writeFile(notJson, '{"nodes": 3,')
      assertFailure(await runScript(script, [notJson]), name, 2, new RegExp(`^\\w+: scenario file ${escape(notJson)} is not valid JSON \\(.+\\); fix it`))
      const badField = join(dir, 'bad-field.json')
      await writeFile(badField, '{"nodes": 0}')
      assertFailure(await runScript(script, [badField]), name, 2, new RegExp(`^\\w+: scenario file ${escape(badField)}: nodes must be an integer from 1 to 100000$`))
    })
  }

  it('simulations/calibrate.ts: a results directory that does not exist, or is not a real run\'s: exit 2, one line naming it', async () => {
    assertFailure(await runScript('simulations/calibrate.ts', ['/no/such/dir']), 'calibrate', 2,
      /^calibrate: results directory \/no\/such\/dir does not exist: give the output directory of a real run \(node simulations\/run\.ts /)
    const dir = await tempDir('shoal-script-errors-')
    assertFailure(await runScript('simulations/calibrate.ts', [dir, '--fit']), 'calibrate', 2,
      new RegExp(`^calibrate: results file ${escape(join(dir, 'results.json'))} does not exist \\(${escape(dir)} is not the output directory of a whole real run`))
  })

  it('SHOAL_DEBUG=1 adds the whole error, stack included', async () => {
    const r = await runScript('simulations/run.ts', ['no/such/scenario.json'], { env: { SHOAL_DEBUG: '1' } })
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /^run: scenario file no\/such\/scenario\.json does not exist/)
    assert.match(r.stderr, /^\s+at .*scenario\.ts:\d+/m)
  })

  it('benchmarks that need root, run as another user: exit 1, one line with the command to run as root', async t => {
    // As root, the scripts run as nobody (they stop before doing anything); as anyone else, as is.
    const uid = process.getuid?.() === 0 ? 65534 : undefined
    if (uid !== undefined && spawnSync(process.execPath, ['-e', `require('node:fs').accessSync(${JSON.stringify(join(REPO, 'benchmarks/agent.ts'))})`], { uid, gid: uid }).status !== 0) {
      t.skip('user nobody cannot read the repository')
      return
    }
    assertFailure(await runScript('benchmarks/agent.ts', ['--only', 'cold'], { uid }), 'agent', 1,
      /^agent: must run as root \(mounts, chroot and drop_caches need it\): sudo node benchmarks\/agent\.ts --only cold$/)
    assertFailure(await runScript('benchmarks/workloads.ts', ['--runs', '2'], { uid }), 'workloads', 1,
      /^workloads: must run as root \(mounts, runc and drop_caches need it\): sudo node benchmarks\/workloads\.ts --runs 2$/)
  })

  it('what each kind of error prints, and its exit code', () => {
    const line = (err: unknown): string => describeFailure('x', err).line
    assert.deepEqual(describeFailure('x', new UsageError('scenario file a.json does not exist')), { line: 'x: scenario file a.json does not exist', exitCode: 2 })
    // A plain Error is how a script says what went wrong: its message, and its cause's.
    assert.deepEqual(describeFailure('x', new Error('the registry did not start', { cause: new Error('port 5000 in use') })), { line: 'x: the registry did not start (port 5000 in use)', exitCode: 1 })
    assert.equal(line(new Error('building failed: disk full', { cause: new Error('disk full') })), 'x: building failed: disk full')
    assert.equal(line(Object.assign(new Error('ENOENT: no such file or directory, open \'/a\''), { code: 'ENOENT', syscall: 'open' })),
      'x: ENOENT: no such file or directory, open \'/a\'; check the path, that it exists and its permissions (SHOAL_DEBUG=1 shows where it failed)')
    // Bugs: where they happened and how to see the trace.
    assert.match(line(new TypeError('Cannot read properties of undefined (reading \'x\')')), /^x: TypeError: Cannot read properties of undefined \(reading 'x'\); this is a bug \(at test\/scripts\/cli-args\.test\.ts:\d+\): rerun with SHOAL_DEBUG=1 for the whole trace$/)
    assert.match(line('a string'), /^x: thrown: 'a string'; this is a bug: rerun with SHOAL_DEBUG=1/)
    // fetch's TypeError over a refused connection is a failure, not a bug.
    assert.equal(line(new TypeError('fetch failed', { cause: new Error('connect ECONNREFUSED 127.0.0.1:1') })), 'x: fetch failed (connect ECONNREFUSED 127.0.0.1:1)')
  })
})
