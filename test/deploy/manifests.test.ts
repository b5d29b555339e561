import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { access, readFile, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { promisify } from 'node:util'
import { parseAllDocuments } from 'yaml'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { loadConfigFile } from '../../src/agent/config.ts'
import { tempDir } from '../helpers/tmp.ts'

const execFileAsync = promisify(execFile)
const root = join(import.meta.dirname, '..', '..')
const docker = join(root, 'docker')

/** Every `--flag` in ARGS must be one `shoal SUBCOMMAND --help` lists. */
async function assertFlagsExist (args: string[]): Promise<void> {
  const sub = args[0] === 'origin' ? ['origin', args[1]!] : [args[0]!]
  const { stdout: help } = await execFileAsync(SHOAL_BIN, [...sub, '--help'])
  for (const flag of args.filter(a => a.startsWith('--'))) {
    assert.ok(help.includes(flag), `shoal ${sub.join(' ')} has no ${flag} flag (used in the deployment files)`)
  }
}

describe('deployment files', () => {
  it('Kubernetes manifests validate against the Kubernetes API schemas', async () => {
    const files = (await readdir(join(docker, 'k8s'))).filter(f => f.endsWith('.yaml'))
    const kinds: string[] = []
    for (const file of files) {
      for (const doc of parseAllDocuments(await readFile(join(docker, 'k8s', file), 'utf8'))) {
        assert.deepEqual(doc.errors, [], file)
        const object = doc.toJS() as { apiVersion: string, kind: string }
        const [group, version] = object.apiVersion.includes('/') ? object.apiVersion.split('/') : [undefined, object.apiVersion]
        const modulePath = `kubernetes-models/${group !== undefined ? `${group}/` : ''}${version}/${object.kind}`
        const Model = (await import(modulePath) as Record<string, new (o: unknown) => { validate: () => void }>)[object.kind]!
        assert.doesNotThrow(() => new Model(object).validate(), `${file}: ${object.kind} is not valid`)
        kinds.push(object.kind)
      }
    }
    assert.deepEqual(kinds.sort(), ['ConfigMap', 'DaemonSet', 'Namespace', 'Secret', 'Service'])
  })

  it('the ConfigMap holds an agent config shoal accepts, and the DaemonSet uses real flags', async () => {
    const docs = parseAllDocuments(await readFile(join(docker, 'k8s', 'config.yaml'), 'utf8')).map(d => d.toJS() as { kind: string, data?: Record<string, string> })
    const file = join(await tempDir(), 'config.json')
    await writeFile(file, docs.find(d => d.kind === 'ConfigMap')!.data!['config.json']!)
    const config = await loadConfigFile(file)
    assert.ok(config.origins?.length === 1 && config.trust?.length === 1)
    const ds = parseAllDocuments(await readFile(join(docker, 'k8s', 'daemonset.yaml'), 'utf8'))[0]!.toJS() as { spec: { template: { spec: { containers: Array<{ args: string[] }> } } } }
    await assertFlagsExist(ds.spec.template.spec.containers[0]!.args)
  })

  it('the compose file runs commands shoal has, and the Dockerfile uses the shared set-up script', async () => {
    const compose = parseAllDocuments(await readFile(join(docker, 'compose.yaml'), 'utf8'))[0]!.toJS() as { services: Record<string, { command: string[] }> }
    assert.ok(Object.keys(compose.services).length >= 4)
    for (const service of Object.values(compose.services)) await assertFlagsExist(service.command)
    const dockerfile = await readFile(join(docker, 'Dockerfile'), 'utf8')
    assert.match(dockerfile, /bash scripts\/setup\.sh/)
    for (const m of dockerfile.matchAll(/^COPY (.+) \S+$/gm)) {
      for (const path of m[1]!.split(' ')) await access(join(root, path))
    }
  })
})
