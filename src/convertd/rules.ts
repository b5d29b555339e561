import { readFile } from 'node:fs/promises'
import { extname, isAbsolute, dirname, resolve } from 'node:path'
import { parse as parseYaml } from 'yaml'
import { UsageError } from '../errors.ts'
import { parseLifetime } from '../format/signing.ts'
import type { Platform } from '../convert/source-image.ts'
import { CONVERTD_DEFAULTS } from './constants.ts'
import type { RuleDecision, RuleSet } from './types.ts'

/**
 * Which pushes convertd converts, and how. The rules file (JSON, or YAML for a
 * `.yaml`/`.yml` name):
 *
 *   include:  REPO:TAG globs to convert (required, at least one)
 *   exclude:  REPO:TAG globs never to convert, even if included
 *   key:      signing key file (default: --key)
 *   expires:  signature lifetime, as `shoal convert --expires` (default shoal's)
 *   destination: { repository: "{repo}", tag: "{tag}-shoal" }
 *
 * Globs: `*` is any run of characters but `/`, `**` any run including `/`, `?` one
 * character but `/`. A pattern without `:TAG` means every tag. shoal's own artifacts
 * are never converted, whatever the rules say (see isShoalArtifactTag).
 */
export interface RulesFile {
  include: string[]
  exclude?: string[]
  key?: string
  expires?: string
  destination?: { repository?: string, tag?: string }
}

const KNOWN_KEYS = new Set(['include', 'exclude', 'key', 'expires', 'destination'])

export async function loadRules (path: string, defaultKey: string | undefined): Promise<Rules> {
  let text: string
  try { text = await readFile(path, 'utf8') } catch (err) {
    throw new UsageError(`cannot read the rules file ${path} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); pass --rules FILE, a JSON or YAML file with "include": ["REPO:TAG", ...]`)
  }
  const yaml = ['.yaml', '.yml'].includes(extname(path).toLowerCase())
  let value: unknown
  try { value = yaml ? parseYaml(text) : JSON.parse(text) } catch (err) {
    throw new UsageError(`the rules file ${path} is not valid ${yaml ? 'YAML' : 'JSON'}: ${(err as Error).message}`)
  }
  return new Rules(checkRulesFile(value, path), { defaultKey, baseDir: dirname(resolve(path)) })
}

function checkRulesFile (value: unknown, path: string): RulesFile {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new UsageError(`the rules file ${path} must hold an object with "include": ["REPO:TAG", ...]`)
  const v = value as Record<string, unknown>
  for (const key of Object.keys(v)) if (!KNOWN_KEYS.has(key)) throw new UsageError(`the rules file ${path}: unknown key "${key}" (known: ${[...KNOWN_KEYS].join(', ')})`)
  const strings = (key: string): string[] | undefined => {
    const list = v[key]
    if (list === undefined) return undefined
    if (!Array.isArray(list) || !list.every(x => typeof x === 'string' && x !== '')) throw new UsageError(`the rules file ${path}: "${key}" must be a list of REPO:TAG globs`)
    return list as string[]
  }
  const include = strings('include')
  if (include === undefined || include.length === 0) throw new UsageError(`the rules file ${path} has no "include" globs: name what to convert, e.g. "include": ["python:*", "team/**"]`)
  const exclude = strings('exclude')
  for (const key of ['key', 'expires'] as const) if (v[key] !== undefined && typeof v[key] !== 'string') throw new UsageError(`the rules file ${path}: "${key}" must be a string`)
  const d = v.destination
  if (d !== undefined && (typeof d !== 'object' || d === null || Array.isArray(d) || Object.entries(d).some(([k, x]) => !['repository', 'tag'].includes(k) || typeof x !== 'string'))) {
    throw new UsageError(`the rules file ${path}: "destination" takes "repository" and "tag" templates, e.g. {"tag": "{tag}-shoal"}`)
  }
  return {
    include,
    ...(exclude !== undefined ? { exclude } : {}),
    ...(v.key !== undefined ? { key: v.key as string } : {}),
    ...(v.expires !== undefined ? { expires: v.expires as string } : {}),
    ...(d !== undefined ? { destination: d as RulesFile['destination'] } : {})
  }
}

export class Rules implements RuleSet {
  private readonly include: Glob[]
  private readonly exclude: Glob[]
  private readonly key: string | undefined
  private readonly lifetimeMs: number | null | undefined
  private readonly repoTemplate: string
  private readonly tagTemplate: string
  private readonly ownTag: RegExp

  constructor (file: RulesFile, options: { defaultKey: string | undefined, baseDir?: string }) {
    this.include = file.include.map(compileGlob)
    this.exclude = (file.exclude ?? []).map(compileGlob)
    const key = file.key ?? options.defaultKey
    this.key = key === undefined ? undefined : isAbsolute(key) || options.baseDir === undefined ? key : resolve(options.baseDir, key)
    this.lifetimeMs = file.expires !== undefined ? parseLifetime(file.expires, 'rules "expires"') : undefined
    this.repoTemplate = file.destination?.repository ?? CONVERTD_DEFAULTS.destinationRepository
    this.tagTemplate = file.destination?.tag ?? CONVERTD_DEFAULTS.destinationTag
    if (!this.tagTemplate.includes('{tag}')) throw new UsageError(`destination tag "${this.tagTemplate}" must contain {tag}: each source tag needs its own converted tag`)
    if (this.tagTemplate === '{tag}' && this.repoTemplate === '{repo}') throw new UsageError('destination "{repo}:{tag}" would overwrite the source image; give the tag a suffix such as "{tag}-shoal"')
    // The tags convertd writes, recognised so that their pushes never convert again.
    const [before, after] = this.tagTemplate.split('{tag}', 2) as [string, string]
    this.ownTag = new RegExp(`^${escapeRegExp(before)}.+${escapeRegExp(after)}(?:-[a-z0-9]+)*$`)
  }

  /** The signing key file every job uses (checked at start: a service without one converts nothing). */
  get signingKey (): string | undefined { return this.key }

  decide (repository: string, tag: string): RuleDecision {
    if (isShoalArtifactTag(tag) || this.ownTag.test(tag)) return { convert: false, why: 'a shoal artifact (conversion, signature or digest tag)' }
    const name = `${repository}:${tag}`
    if (!this.include.some(g => g.test(name))) return { convert: false, why: 'not included by the rules' }
    const excluded = this.exclude.find(g => g.test(name))
    if (excluded !== undefined) return { convert: false, why: `excluded by the rule "${excluded.source}"` }
    if (this.key === undefined) return { convert: false, why: 'no signing key: pass --key or set "key" in the rules' }
    return {
      convert: true,
      destRepository: this.repoTemplate.replaceAll('{repo}', repository),
      destTag: renderTag(this.tagTemplate, tag),
      key: this.key,
      ...(this.lifetimeMs !== undefined ? { lifetimeMs: this.lifetimeMs } : {})
    }
  }
}

/** The signature (`sha256-<hex>.sig`) and digest (`sha256-<hex>.shoal`) tags shoal writes. */
export function isShoalArtifactTag (tag: string): boolean {
  return /^sha256-[0-9a-f]{64}\.(?:sig|shoal)$/.test(tag)
}

/**
 * The destination tag of one platform of a multi-platform image: the image's own
 * destination tag and `-os-arch[-variant]`, so platforms do not overwrite each other
 * (the digest tags never collide: each platform manifest has its own digest).
 */
export function platformTag (destTag: string, platform: Platform): string {
  const suffix = `-${[platform.os, platform.architecture, platform.variant].filter(x => x !== undefined && x !== '').join('-')}`.toLowerCase().replace(/[^a-z0-9._-]/g, '_')
  return `${destTag.slice(0, 128 - suffix.length)}${suffix}`
}

/** TEMPLATE with {tag} replaced, the source tag cut so the result stays within a tag's 128 characters. */
function renderTag (template: string, tag: string): string {
  const room = 128 - template.replaceAll('{tag}', '').length
  return template.replaceAll('{tag}', tag.slice(0, Math.max(1, room)))
}

interface Glob { source: string, test: (name: string) => boolean }

/** REPO[:TAG] glob → a matcher of `repo:tag`. */
export function compileGlob (pattern: string): Glob {
  const colon = pattern.lastIndexOf(':')
  const [repo, tag] = colon >= 0 && !pattern.slice(colon).includes('/') ? [pattern.slice(0, colon), pattern.slice(colon + 1)] : [pattern, '*']
  const re = new RegExp(`^${globToRegExp(repo)}:${globToRegExp(tag)}$`)
  return { source: pattern, test: name => re.test(name) }
}

function globToRegExp (glob: string): string {
  let out = ''
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!
    if (c === '*' && glob[i + 1] === '*') { out += '.*'; i++ } else if (c === '*') out += '[^/]*'
    else if (c === '?') out += '[^/]'
    else out += escapeRegExp(c)
  }
  return out
}

function escapeRegExp (text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')
}
