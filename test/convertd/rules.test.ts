import assert from 'node:assert/strict'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { compileGlob, isShoalArtifactTag, loadRules, platformTag, Rules } from '../../src/convertd/rules.ts'
import { ShoalError } from '../../src/errors.ts'
import { tempDir } from '../helpers/tmp.ts'

const hex = 'a'.repeat(64)

test('globs: * stays within a path segment, ** crosses them, a pattern without :TAG takes every tag', () => {
  const g = (p: string, name: string): boolean => compileGlob(p).test(name)
  assert.ok(g('python:*', 'python:3.12'))
  assert.ok(!g('python:*', 'team/python:3'))
  assert.ok(g('team/*:*', 'team/app:1'))
  assert.ok(!g('team/*:*', 'team/sub/app:1'))
  assert.ok(g('team/**', 'team/sub/app:1'))
  assert.ok(g('python', 'python:latest'))
  assert.ok(g('python:3.?', 'python:3.9'))
  assert.ok(!g('python:3.?', 'python:3.12'))
  assert.ok(!g('python:3.1', 'python:3x1'), 'a dot is a dot')
  assert.ok(g('localhost/app:v*', 'localhost/app:v2'), 'a ":" in the repository part is the tag separator only when last')
})

test('include, exclude, and shoal\'s own artifacts whatever the rules say', () => {
  const rules = new Rules({ include: ['**'], exclude: ['*:*-debug'] }, { defaultKey: '/k/shoal.key' })
  assert.deepEqual(rules.decide('python', '3'), { convert: true, destRepository: 'python', destTag: '3-shoal', key: '/k/shoal.key' })
  assert.deepEqual(rules.decide('python', '3-debug'), { convert: false, why: 'excluded by the rule "*:*-debug"' })
  for (const tag of ['3-shoal', '3-shoal-linux-arm64-v8', `sha256-${hex}.sig`, `sha256-${hex}.shoal`]) {
    const d = rules.decide('python', tag)
    assert.equal(d.convert, false, tag)
  }
  assert.equal(new Rules({ include: ['python:*'] }, { defaultKey: '/k' }).decide('perl', '5').convert, false)
  assert.equal(isShoalArtifactTag(`sha256-${hex}.sig`), true)
  assert.equal(isShoalArtifactTag('sha256-abc.sig'), false)
})

test('destination templates, tags cut to 128 characters, platform tags, and no key means no conversion', () => {
  const rules = new Rules({ include: ['**'], destination: { repository: 'shoal/{repo}', tag: 'lazy-{tag}' }, expires: '30d' }, { defaultKey: 'keys/x.key', baseDir: '/etc/shoal' })
  const d = rules.decide('team/app', '1')
  assert.deepEqual(d, { convert: true, destRepository: 'shoal/team/app', destTag: 'lazy-1', key: '/etc/shoal/keys/x.key', lifetimeMs: 30 * 86_400_000 })
  assert.equal(rules.decide('team/app', 'lazy-1').convert, false, 'its own tags, by the template')
  const long = new Rules({ include: ['**'] }, { defaultKey: '/k' }).decide('a', 'x'.repeat(128))
  assert.ok(long.convert && long.destTag.length === 128 && long.destTag.endsWith('-shoal'))
  assert.equal(platformTag('3-shoal', { os: 'linux', architecture: 'arm64', variant: 'v8' }), '3-shoal-linux-arm64-v8')
  assert.equal(platformTag('x'.repeat(128), { os: 'linux', architecture: 'amd64' }).length, 128)
  assert.deepEqual(new Rules({ include: ['**'] }, { defaultKey: undefined }).decide('a', '1'), { convert: false, why: 'no signing key: pass --key or set "key" in the rules' })
  assert.throws(() => new Rules({ include: ['**'], destination: { tag: 'fixed' } }, { defaultKey: '/k' }), /must contain \{tag\}/)
  assert.throws(() => new Rules({ include: ['**'], destination: { tag: '{tag}' } }, { defaultKey: '/k' }), /overwrite the source image/)
})

test('rules files: JSON and YAML, and one-line errors that say what to write', async () => {
  const dir = await tempDir()
  await writeFile(join(dir, 'rules.json'), JSON.stringify({ include: ['python:*'], key: 'shoal.key' }))
  await writeFile(join(dir, 'rules.yaml'), 'include:\n  - "python:*"\nexclude: ["python:2*"]\n')
  const json = await loadRules(join(dir, 'rules.json'), undefined)
  assert.deepEqual(json.decide('python', '3'), { convert: true, destRepository: 'python', destTag: '3-shoal', key: join(dir, 'shoal.key') })
  const yaml = await loadRules(join(dir, 'rules.yaml'), '/k')
  assert.equal(yaml.decide('python', '3').convert, true)
  assert.equal(yaml.decide('python', '2.7').convert, false)
  for (const [content, message] of [
    ['{"include": []}', /no "include" globs/],
    ['{"include": ["a"], "inclde": ["b"]}', /unknown key "inclde"/],
    ['{"include": "a"}', /must be a list/],
    ['{"include": ["a"], "destination": {"tag": 1}}', /"destination" takes/],
    ['{', /not valid JSON/]
  ] as const) {
    await writeFile(join(dir, 'bad.json'), content)
    await assert.rejects(loadRules(join(dir, 'bad.json'), '/k'), (err: Error) => err instanceof ShoalError && message.test(err.message) && !err.message.includes('\n'))
  }
  await assert.rejects(loadRules(join(dir, 'missing.json'), '/k'), /cannot read the rules file .* \(ENOENT\)/)
})
