import { readFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { UsageError } from '../errors.ts'
import type { RegistryAccess } from '../registry/client.ts'
import { CONVERTD_DEFAULTS } from './constants.ts'

/** Everything `shoal convertd` needs; from a JSON file (--config), overridden by flags. */
export interface ConvertdConfig {
  /** The queue database and the staging area of running conversions. */
  stateDir: string
  /** HOST:PORT for POST /events and GET /metrics (port 0: any free port). */
  listen: string
  /** The signing key (shoal keygen's shoal.key), unless the rules name one. */
  key?: string
  /** The rules file: which REPO:TAG to convert, and how. */
  rules: string
  /** A file holding the token the registry sends as `Authorization: Bearer TOKEN`. */
  tokenFile: string
  /**
   * The registry to convert in: `address` (HOST:PORT; default: the Host the pushing
   * client used, from each event), credentials USER:PASSWORD (else the docker/podman
   * auth files), caFile, plainHttp.
   */
  registry: RegistryAccess & { address?: string }
  concurrency: number
  maxAttempts: number
  retryBaseMs: number
  retryMaxMs: number
  pollMs: number
}

export function defaultConvertdConfig (): ConvertdConfig {
  return {
    stateDir: CONVERTD_DEFAULTS.stateDir,
    listen: CONVERTD_DEFAULTS.listen,
    rules: '',
    tokenFile: '',
    registry: {},
    concurrency: CONVERTD_DEFAULTS.concurrency,
    maxAttempts: CONVERTD_DEFAULTS.maxAttempts,
    retryBaseMs: CONVERTD_DEFAULTS.retryBaseMs,
    retryMaxMs: CONVERTD_DEFAULTS.retryMaxMs,
    pollMs: CONVERTD_DEFAULTS.pollMs
  }
}

/** Reads a JSON config file (keys as in ConvertdConfig). */
export async function loadConvertdConfigFile (path: string): Promise<Partial<ConvertdConfig>> {
  let text: string
  try { text = await readFile(path, 'utf8') } catch { throw new UsageError(`cannot read config file ${path}`) }
  let value: unknown
  try { value = JSON.parse(text) } catch (err) { throw new UsageError(`config file ${path} is not valid JSON: ${(err as Error).message}`) }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new UsageError(`config file ${path} must hold a JSON object`)
  const known = new Set([...Object.keys(defaultConvertdConfig()), 'key'])
  for (const key of Object.keys(value)) {
    if (!known.has(key)) throw new UsageError(`config file ${path}: unknown key "${key}" (known: ${[...known].join(', ')})`)
  }
  return value as Partial<ConvertdConfig>
}

/** Checks a finished config and makes paths absolute. `token: false` for sync, which receives no events. */
export function validateConvertdConfig (config: ConvertdConfig, needs: { token: boolean }): ConvertdConfig {
  if (config.rules === '') throw new UsageError('no rules: pass --rules FILE (JSON or YAML, e.g. {"include": ["python:*"]})')
  if (needs.token && config.tokenFile === '') throw new UsageError('no token: pass --token-file FILE holding the secret the registry sends as "Authorization: Bearer TOKEN" (e.g. openssl rand -hex 32 > FILE)')
  if (!/^[^\s]*:\d+$/.test(config.listen)) throw new UsageError(`listen address ${config.listen}: write HOST:PORT, e.g. 0.0.0.0:8910`)
  for (const [name, value, min] of [['concurrency', config.concurrency, 1], ['maxAttempts', config.maxAttempts, 1], ['retryBaseMs', config.retryBaseMs, 0], ['retryMaxMs', config.retryMaxMs, 0], ['pollMs', config.pollMs, 10]] as const) {
    if (!Number.isSafeInteger(value) || value < min) throw new UsageError(`${name} ${value}: write an integer of at least ${min}`)
  }
  return {
    ...config,
    stateDir: resolve(config.stateDir),
    rules: resolve(config.rules),
    tokenFile: config.tokenFile === '' ? '' : resolve(config.tokenFile),
    ...(config.key !== undefined ? { key: resolve(config.key) } : {}),
    registry: { ...config.registry, ...(config.registry.caFile !== undefined ? { caFile: resolve(config.registry.caFile) } : {}) }
  }
}

/** The token from FILE (surrounding whitespace dropped), long enough to guard the queue. */
export async function readToken (file: string): Promise<string> {
  let text: string
  try { text = await readFile(file, 'utf8') } catch (err) {
    throw new UsageError(`cannot read the token file ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); create it, e.g. openssl rand -hex 32 > ${file}`)
  }
  const token = text.trim()
  if (token.length < CONVERTD_DEFAULTS.minTokenLength || /\s/.test(token)) {
    throw new UsageError(`the token in ${file} must be one word of at least ${CONVERTD_DEFAULTS.minTokenLength} characters (e.g. openssl rand -hex 32 > ${file})`)
  }
  return token
}
