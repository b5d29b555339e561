import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { access, readFile, readdir, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { describe, it } from 'node:test'
import { promisify } from 'node:util'
import { parseAllDocuments } from 'yaml'
import { SHOAL_BIN } from '../../src/agent/agent-process.ts'
import { defaultConfig, loadConfigFile, validateConfig, type AgentConfig } from '../../src/agent/config.ts'
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

/** The ConfigMap's config.json as `shoal agent --config` reads it: loaded, over the defaults, validated. */
async function k8sAgentConfig (): Promise<{ fromFile: Partial<AgentConfig>, config: AgentConfig }> {
  const docs = parseAllDocuments(await readFile(join(docker, 'k8s', 'config.yaml'), 'utf8')).map(d => d.toJS() as { kind: string, data?: Record<string, string> })
  const file = join(await tempDir(), 'config.json')
  await writeFile(file, docs.find(d => d.kind === 'ConfigMap')!.data!['config.json']!)
  const fromFile = await loadConfigFile(file)
  const defaults = defaultConfig()
  return { fromFile, config: validateConfig({ ...defaults, ...fromFile, p2p: { ...defaults.p2p, ...fromFile.p2p } }) }
}

interface PodSpec {
  containers: Array<{ args: string[], securityContext?: { privileged?: boolean }, volumeMounts: Array<{ name: string, mountPath: string, mountPropagation?: string }> }>
  volumes: Array<{ name: string, hostPath?: { path: string, type?: string } }>
  hostPID?: boolean
}

async function daemonSetPod (): Promise<PodSpec> {
  const ds = parseAllDocuments(await readFile(join(docker, 'k8s', 'daemonset.yaml'), 'utf8'))[0]!.toJS() as { spec: { template: { spec: PodSpec } } }
  return ds.spec.template.spec
}

/** The host path of the volume mounted at exactly PATH in the agent's container, and the mount. */
function hostMount (pod: PodSpec, path: string): { hostPath: { path: string, type?: string }, mountPropagation?: string } {
  const mount = pod.containers[0]!.volumeMounts.find(m => m.mountPath === path)
  assert.ok(mount !== undefined, `the DaemonSet mounts nothing at ${path}`)
  const volume = pod.volumes.find(v => v.name === mount.name)
  assert.ok(volume?.hostPath !== undefined, `the volume mounted at ${path} (${mount.name}) is not a host path`)
  return { hostPath: volume.hostPath, ...(mount.mountPropagation !== undefined ? { mountPropagation: mount.mountPropagation } : {}) }
}

type TomlValue = string | boolean | number
/**
 * Just enough TOML for containerd-config.toml: [tables] with dotted and quoted names,
 * `key = value` with basic strings, booleans and integers, # comments. Tables are keyed
 * by their name's parts joined with NUL; a table or key given twice is an error, as in TOML.
 */
function parseToml (text: string): Map<string, Map<string, TomlValue>> {
  const tables = new Map<string, Map<string, TomlValue>>([['', new Map()]])
  let current = tables.get('')!
  for (const [n, raw] of text.split('\n').entries()) {
    const line = stripComment(raw).trim()
    if (line === '') continue
    const where = `containerd-config.toml:${n + 1}`
    const header = /^\[(.+)\]$/.exec(line)
    if (header !== null) {
      const name = splitDotted(header[1]!, where).join('\0')
      assert.ok(!tables.has(name), `${where}: table [${header[1]}] defined twice`)
      current = new Map()
      tables.set(name, current)
      continue
    }
    const kv = /^([A-Za-z0-9_-]+)\s*=\s*(.+)$/.exec(line)
    assert.ok(kv !== null, `${where}: cannot parse ${JSON.stringify(line)}`)
    const [, key, value] = kv
    assert.ok(!current.has(key!), `${where}: key ${key} given twice`)
    if (value === 'true' || value === 'false') current.set(key!, value === 'true')
    else if (/^-?\d+$/.test(value!)) current.set(key!, Number(value))
    else if (/^"(?:[^"\\]|\\.)*"$/.test(value!)) current.set(key!, JSON.parse(value!) as string)
    else assert.fail(`${where}: unsupported value ${value}`)
  }
  return tables
}

function stripComment (line: string): string {
  let quoted = false
  for (let i = 0; i < line.length; i++) {
    if (line[i] === '\\' && quoted) i++
    else if (line[i] === '"') quoted = !quoted
    else if (line[i] === '#' && !quoted) return line.slice(0, i)
  }
  return line
}

function splitDotted (name: string, where: string): string[] {
  const parts: string[] = []
  const re = /\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_-]+))\s*(\.|$)/y
  while (re.lastIndex < name.length) {
    const m = re.exec(name)
    assert.ok(m !== null, `${where}: cannot parse table name [${name}]`)
    parts.push(m[1] !== undefined ? JSON.parse(`"${m[1]}"`) as string : m[2]!)
    if (m[3] === '') break
  }
  return parts
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
    const { fromFile, config } = await k8sAgentConfig()
    // A snapshotter needs no origin of its own (each image names its registry), only trusted keys and its socket.
    assert.ok(fromFile.trust?.length === 1)
    assert.notEqual(config.snapshotterSocket, '', 'config.json sets no snapshotterSocket')
    await assertFlagsExist((await daemonSetPod()).containers[0]!.args)
  })

  it('the DaemonSet shares the state and socket directories with the host at the same paths', async () => {
    const { config } = await k8sAgentConfig()
    const pod = await daemonSetPod()
    // Lazy layers are FUSE mounts under <stateDir>/snapshotter that containerd's shim, on the
    // host, uses as overlayfs lower dirs by path: same path, and the mounts must reach the host.
    const state = hostMount(pod, config.stateDir)
    assert.equal(state.hostPath.path, config.stateDir)
    assert.equal(state.mountPropagation, 'Bidirectional')
    // containerd on the host dials the socket: its directory is a host directory at the same path.
    const socketDir = dirname(config.snapshotterSocket)
    const run = hostMount(pod, socketDir)
    assert.equal(run.hostPath.path, socketDir)
    assert.equal(run.hostPath.type, 'DirectoryOrCreate')
    assert.equal(pod.containers[0]!.securityContext?.privileged, true)
    assert.equal(hostMount(pod, '/dev/fuse').hostPath.path, '/dev/fuse')
    assert.notEqual(pod.hostPID, true, 'the agent needs no host PID namespace')
  })

  it('containerd-config.toml points containerd at the socket the agent serves', async () => {
    const { config } = await k8sAgentConfig()
    const toml = parseToml(await readFile(join(docker, 'k8s', 'containerd-config.toml'), 'utf8'))
    const cri = toml.get(['plugins', 'io.containerd.grpc.v1.cri', 'containerd'].join('\0'))
    assert.ok(cri !== undefined, 'no [plugins."io.containerd.grpc.v1.cri".containerd] table')
    const name = cri.get('snapshotter')
    assert.equal(typeof name, 'string')
    const proxy = toml.get(['proxy_plugins', name as string].join('\0'))
    assert.ok(proxy !== undefined, `the CRI snapshotter ${String(name)} is no [proxy_plugins.${String(name)}]`)
    assert.equal(proxy.get('type'), 'snapshot')
    assert.equal(proxy.get('address'), config.snapshotterSocket)
    // containerd 1.6 defaults to true, and then passes no image labels: nothing would be lazy.
    assert.equal(cri.get('disable_snapshot_annotations'), false)
  })

  it('the compose file runs commands shoal has, and the Dockerfile uses the shared set-up script', async () => {
    const compose = parseAllDocuments(await readFile(join(docker, 'compose.yaml'), 'utf8'))[0]!.toJS() as { services: Record<string, { image: string, command: string[] }> }
    assert.ok(Object.keys(compose.services).length >= 4)
    for (const service of Object.values(compose.services)) if (service.image === 'shoal') await assertFlagsExist(service.command)
    const dockerfile = await readFile(join(docker, 'Dockerfile'), 'utf8')
    assert.match(dockerfile, /bash scripts\/setup\.sh/)
    // The image carries the libp2p bundle, built in a stage of its own (esbuild is a development dependency).
    assert.match(dockerfile, /^COPY --from=libp2p-bundle \S+libp2p\.mjs node_modules\/\.cache\/shoal\/libp2p\.mjs$/m)
    // Paths from the build context (not --from another stage) must exist.
    for (const m of dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)) {
      for (const path of m[1]!.split(' ')) await access(join(root, path))
    }
  })

  it('compose\'s convertd: its config loads, and the registry notifies it with the token it holds', async () => {
    const { loadConvertdConfigFile, defaultConvertdConfig, validateConvertdConfig } = await import('../../src/convertd/config.ts')
    const fromFile = await loadConvertdConfigFile(join(docker, 'convertd', 'config.json'))
    const config = validateConvertdConfig({ ...defaultConvertdConfig(), ...fromFile }, { token: true })
    assert.equal(config.registry.address, 'registry:5000')
    const registryConfig = parseAllDocuments(await readFile(join(docker, 'registry', 'config.yml'), 'utf8'))[0]!.toJS() as { notifications: { endpoints: Array<{ url: string, headers: { Authorization: string[] } }> } }
    const endpoint = registryConfig.notifications.endpoints[0]!
    assert.equal(endpoint.url, `http://convertd:${config.listen.split(':')[1]}/events`)
    const token = (await readFile(join(docker, 'convertd', 'token'), 'utf8')).trim()
    assert.deepEqual(endpoint.headers.Authorization, [`Bearer ${token}`])
    const { loadRules } = await import('../../src/convertd/rules.ts')
    assert.equal((await loadRules(join(docker, 'convertd', 'rules.json'), config.key)).decide('python', '3').convert, true)
  })
})
