import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { promisify } from 'node:util'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { generateKeys } from '../../src/format/signing.ts'
import { tempDir } from '../helpers/tmp.ts'
import { freePort } from '../registry/helpers.ts'
import { startConvertd } from './helpers.ts'

const execFileAsync = promisify(execFile)

/** Runs `shoal convertd ARGS`, expecting it to fail; returns exit code and stderr. */
async function fails (args: string[]): Promise<{ code: number, stderr: string }> {
  try {
    await execFileAsync(SHOAL_BIN, ['convertd', ...args], { timeout: 20_000 })
  } catch (err) {
    const e = err as { code: number, stderr: string }
    return { code: e.code, stderr: e.stderr }
  }
  throw new Error(`shoal convertd ${args.join(' ')} succeeded`)
}

test('convertd\'s mistakes are one line that says what to do; SIGTERM stops an idle service at once', { timeout: 120_000 }, async () => {
  const dir = await tempDir()
  await generateKeys(join(dir, 'keys'))
  await writeFile(join(dir, 'rules.json'), '{"include": ["python:*"]}')
  await writeFile(join(dir, 'token'), 'convertd-cli-token-0123456789')
  await writeFile(join(dir, 'short-token'), 'secret')
  const base = ['--state', join(dir, 'state'), '--listen', '127.0.0.1:0']
  for (const [args, message] of [
    [[...base, '--token-file', join(dir, 'token')], /^shoal: no rules: pass --rules FILE/],
    [[...base, '--rules', join(dir, 'rules.json')], /^shoal: no token: pass --token-file FILE/],
    [[...base, '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'short-token'), '--key', join(dir, 'keys', 'shoal.key')], /^shoal: the token in .* must be one word of at least 16 characters/],
    [[...base, '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'token')], /^shoal: no signing key: pass --key FILE/],
    [[...base, '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'token'), '--key', join(dir, 'keys', 'shoal.pub')], /^shoal: .*shoal\.pub is not a PEM private key/],
    [[...base, '--rules', join(dir, 'nope.json'), '--token-file', join(dir, 'token'), '--key', join(dir, 'keys', 'shoal.key')], /^shoal: cannot read the rules file .*nope\.json \(ENOENT\)/],
    [['sync', '--state', join(dir, 'state'), '--rules', join(dir, 'rules.json')], /^shoal: sync needs the registry's address: pass --registry HOST:PORT/],
    [['status', '--state', join(dir, 'nothing-here')], /^shoal: no convertd queue at .*: pass the --state directory/]
  ] as const) {
    const { code, stderr } = await fails([...args])
    assert.equal(code, 2, stderr)
    assert.match(stderr, message)
    assert.equal(stderr.trimEnd().split('\n').length, 1, stderr)
  }

  const service = await startConvertd(['--listen', `127.0.0.1:${await freePort()}`, '--state', join(dir, 'state'), '--rules', join(dir, 'rules.json'), '--token-file', join(dir, 'token'), '--key', join(dir, 'keys', 'shoal.key')], join(dir, 'log'))
  assert.equal((await fetch(`${service.ready.url}/healthz`)).status, 200)
  const started = Date.now()
  await service.stop(10_000)
  assert.equal(service.child.exitCode, 0)
  assert.ok(Date.now() - started < 2_000, `stopped in ${Date.now() - started} ms`)
})
