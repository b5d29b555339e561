/**
 * The command lines of the scripts beside the product (simulations/, benchmarks/,
 * scripts/): every one parses its options with scripts/lib/args.ts, so a mistyped
 * option gets `SCRIPT: what is wrong` and the usage (exit 2), and --help the usage
 * (exit 0), never Node's stack trace. Each case fails in the option parsing, before
 * the script sets anything up: nothing here runs a benchmark or a simulation.
 */
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'
import { describe, it } from 'node:test'

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

async function runScript (path: string, args: string[]): Promise<Exit> {
  const child = spawn(process.execPath, [join(REPO, path), ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 })
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
