import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { FormatError, SignatureError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'
import { imageName } from '../format/signing.ts'
import { writeAtomic } from '../util/files.ts'

/** The file in an agent's state dir that remembers the highest signed version seen per image name. */
export const SIGNED_VERSIONS_FILE = 'signed-versions.json'

/** A signed version lower than one already accepted for the name (or the same version of another manifest). */
export class RollbackError extends SignatureError {
  constructor (message: string) {
    super(message)
    this.name = 'RollbackError'
  }
}

export interface SeenVersion {
  version: number
  manifest: Digest
  /** When this agent first accepted that version (ISO 8601). */
  seenAt: string
}

interface VersionsFile { schemaVersion: 1, names: Record<string, SeenVersion> }

/** One queue per file in this process: check-then-write must not interleave. */
const queues = new Map<string, Promise<unknown>>()

/**
 * Rollback and freeze protection for signed names (TUF's "never go back"): the
 * highest signed version accepted per name, with its manifest, kept in a small JSON
 * file (0600, replaced atomically) that survives restarts. A lower version for a
 * name seen before is refused, and so is the same version with another manifest
 * (one signed version is one image). The file is read on every check, so agents
 * restarted on the same state dir, and several guards on one file, agree.
 */
export class RollbackGuard {
  readonly path: string

  constructor (path: string) {
    this.path = path
  }

  static forStateDir (stateDir: string): RollbackGuard {
    return new RollbackGuard(join(stateDir, SIGNED_VERSIONS_FILE))
  }

  /**
   * Accepts VERSION of MANIFEST for NAME, or throws RollbackError. Raises the
   * remembered version when it is higher.
   */
  async accept (name: string, version: number, manifest: Digest, now = new Date()): Promise<void> {
    await this.serialized(async () => {
      const file = await this.read()
      const seen = file.names[name]
      if (seen !== undefined) {
        if (version < seen.version) {
          throw new RollbackError(`${name}: the image ${manifest} is signed as version ${version}, older than version ${seen.version} (${seen.manifest}) this agent saw on ${seen.seenAt}; this is a rollback or a stale mirror, so it is refused. Point the tag at the current image, or re-sign the wanted one with a higher version: shoal sign IMAGE --key KEY`)
        }
        if (version === seen.version) {
          if (manifest === seen.manifest) return
          throw new RollbackError(`${name}: version ${version} is signed for two images, ${seen.manifest} (seen on ${seen.seenAt}) and now ${manifest}; one version must name one image, so it is refused. Re-sign the wanted one with a higher version: shoal sign IMAGE --key KEY`)
        }
      }
      file.names[name] = { version, manifest, seenAt: now.toISOString() }
      await this.write(file)
    })
  }

  /** What was accepted for NAME, if anything. */
  async seen (name: string): Promise<SeenVersion | undefined> {
    return (await this.read()).names[name]
  }

  private async read (): Promise<VersionsFile> {
    let text: string
    try { text = await readFile(this.path, 'utf8') } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { schemaVersion: 1, names: {} }
      throw err
    }
    let file: VersionsFile
    try { file = JSON.parse(text) as VersionsFile } catch { file = undefined as unknown as VersionsFile }
    if (file?.schemaVersion !== 1 || typeof file.names !== 'object' || file.names === null) {
      // Failing closed: forgetting would re-open every rollback this file guards against.
      throw new FormatError(`${this.path}, the record of the image versions this agent accepted, is damaged; signed images are refused until it is fixed or removed (removing it forgets the versions seen, so a rollback is not detected for them)`)
    }
    return file
  }

  private async write (file: VersionsFile): Promise<void> {
    await writeAtomic(this.path, JSON.stringify(file, null, 1) + '\n', { mode: 0o600 })
  }

  private async serialized<T> (fn: () => Promise<T>): Promise<T> {
    const before = queues.get(this.path) ?? Promise.resolve()
    const run = before.catch(() => {}).then(fn)
    const tail = run.catch(() => {})
    queues.set(this.path, tail)
    try { return await run } finally {
      if (queues.get(this.path) === tail) queues.delete(this.path)
    }
  }
}

/**
 * The name an agent checks an image it mounts under: the repository of its registry
 * origin (`--origin docker://HOST/REPO`, the first one when several are mirrors) and
 * the tag asked for, `REPO:TAG`; a bare `TAG` for layout and HTTP origins. A digest
 * asked for gives `REPO@sha256:…` (or `@sha256:…`), checked by repository only and
 * never against the rollback record: a digest pins the image itself.
 */
export function mountName (origins: readonly string[], ref: string): string {
  const registry = origins.find(o => o.startsWith('docker://'))
  let repo: string | undefined
  if (registry !== undefined) {
    const rest = registry.slice('docker://'.length).replace(/\/+$/, '')
    const slash = rest.indexOf('/')
    const host = rest.slice(0, slash)
    repo = imageName(rest.slice(slash + 1), 'x', host).slice(0, -2)
  }
  if (ref.startsWith('sha256:')) return `${repo ?? ''}@${ref}`
  return repo === undefined ? ref : `${repo}:${ref}`
}

/** Whether NAME is one the rollback record keeps (a tag, not a digest). */
export const isTagName = (name: string): boolean => !name.includes('@')
