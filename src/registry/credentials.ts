import { readFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { UsageError } from '../errors.ts'

/**
 * Registry credentials: from a flag (USER:PASSWORD), or from the files that
 * `docker login` and `podman login` write. Those share one shape:
 *
 *   { "auths": { "registry.example.com": { "auth": base64("user:password") } } }
 *
 * Files are searched in the order containers-auth.json(5) gives, which ends
 * with docker's: $REGISTRY_AUTH_FILE (or $XDG_RUNTIME_DIR/containers/auth.json),
 * $XDG_CONFIG_HOME/containers/auth.json, $DOCKER_CONFIG/config.json (default
 * ~/.docker/config.json). The first file with an entry for the registry wins.
 * Keys may name a repository or namespace (podman: `host/team/app`); the most
 * specific match wins. Credential helpers (`credsStore`, `credHelpers`) are not
 * run: pass the credentials as a flag instead.
 */

export interface Credentials {
  username: string
  password: string
}

/** USER:PASSWORD (the password may contain colons; the user name cannot). */
export function parseCredentials (text: string, what: string): Credentials {
  const colon = text.indexOf(':')
  if (colon <= 0) throw new UsageError(`${what} must be USER:PASSWORD`)
  return { username: text.slice(0, colon), password: text.slice(colon + 1) }
}

export interface AuthFileOptions {
  /** Default process.env. */
  env?: NodeJS.ProcessEnv
  /** Default os.homedir(). */
  home?: string
}

/** The auth files to search, in order. */
export function authFilePaths (options: AuthFileOptions = {}): string[] {
  const env = options.env ?? process.env
  const home = options.home ?? homedir()
  const paths: string[] = []
  if (env.REGISTRY_AUTH_FILE !== undefined && env.REGISTRY_AUTH_FILE !== '') paths.push(env.REGISTRY_AUTH_FILE)
  else if (env.XDG_RUNTIME_DIR !== undefined && env.XDG_RUNTIME_DIR !== '') paths.push(join(env.XDG_RUNTIME_DIR, 'containers', 'auth.json'))
  paths.push(join(env.XDG_CONFIG_HOME !== undefined && env.XDG_CONFIG_HOME !== '' ? env.XDG_CONFIG_HOME : join(home, '.config'), 'containers', 'auth.json'))
  paths.push(join(env.DOCKER_CONFIG !== undefined && env.DOCKER_CONFIG !== '' ? env.DOCKER_CONFIG : join(home, '.docker'), 'config.json'))
  return paths
}

/** Credentials for REPOSITORY at REGISTRY from the first auth file that has some, with that file's path. */
export async function findCredentials (registry: string, repository: string, options: AuthFileOptions = {}): Promise<{ credentials: Credentials, file: string } | undefined> {
  const wanted = candidateKeys(registry, repository)
  for (const file of authFilePaths(options)) {
    const auths = await readAuths(file)
    if (auths === undefined) continue
    const byKey = new Map<string, AuthEntry>()
    for (const [key, entry] of Object.entries(auths)) byKey.set(normalizeKey(key), entry)
    for (const key of wanted) {
      const entry = byKey.get(key)
      if (entry === undefined) continue
      const credentials = entryCredentials(entry, file, key)
      if (credentials !== undefined) return { credentials, file }
    }
  }
  return undefined
}

interface AuthEntry { auth?: unknown, username?: unknown, password?: unknown }

async function readAuths (file: string): Promise<Record<string, AuthEntry> | undefined> {
  let text: string
  try { text = await readFile(file, 'utf8') } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined
    throw new UsageError(`cannot read the registry auth file ${file}: ${(err as Error).message}`)
  }
  let value: unknown
  try { value = JSON.parse(text) } catch (err) {
    throw new UsageError(`the registry auth file ${file} is not valid JSON (${(err as Error).message}); fix it or log in again (docker login, podman login)`)
  }
  const auths = (value as { auths?: unknown } | null)?.auths
  return typeof auths === 'object' && auths !== null ? auths as Record<string, AuthEntry> : undefined
}

function entryCredentials (entry: AuthEntry, file: string, key: string): Credentials | undefined {
  if (typeof entry.auth === 'string' && entry.auth !== '') {
    return parseCredentials(Buffer.from(entry.auth, 'base64').toString('utf8'), `the "auth" entry for ${key} in ${file} (base64 of USER:PASSWORD)`)
  }
  if (typeof entry.username === 'string' && typeof entry.password === 'string' && entry.username !== '') {
    return { username: entry.username, password: entry.password }
  }
  return undefined // e.g. only an identity token, which shoal does not use
}

/**
 * `https://index.docker.io/v1/` (docker's legacy key) → `docker.io`; a key with
 * a scheme names a whole registry, one without may name a repository.
 */
function normalizeKey (key: string): string {
  let k = key.trim()
  const scheme = /^[a-z]+:\/\//i.exec(k)
  if (scheme !== null) k = k.slice(scheme[0].length).split('/')[0]!
  k = k.replace(/\/+$/, '')
  const [host, ...rest] = k.split('/')
  return [isDockerHub(host!) ? 'docker.io' : host!, ...rest].join('/')
}

/** `host/a/b/c`, `host/a/b`, `host/a`, `host`: most specific first. */
function candidateKeys (registry: string, repository: string): string[] {
  const host = isDockerHub(registry) ? 'docker.io' : registry
  const parts = repository.split('/')
  const keys: string[] = []
  for (let n = parts.length; n >= 0; n--) keys.push([host, ...parts.slice(0, n)].join('/'))
  return keys
}

/** Docker Hub goes by several names; `docker.io` is the one in image references. */
export function isDockerHub (registry: string): boolean {
  return registry === 'docker.io' || registry === 'index.docker.io' || registry === 'registry-1.docker.io'
}
