import { NotFoundError } from '../errors.ts'
import { conversionTag } from '../oci/conversion-tags.ts'
import { MediaType } from '../oci/types.ts'
import { openRegistryClient, type RegistryAccess } from '../registry/client.ts'
import { queuePush } from './intake.ts'
import type { JobQueue, RuleSet } from './types.ts'

export interface SyncLine {
  image: string
  outcome: 'queued' | 'converted' | 'duplicate' | 'ignored'
  why?: string
}

export interface SyncReport { repositories: number, tags: number, queued: number, converted: number, duplicate: number, ignored: number }

/**
 * The backfill: walks the registry's catalog and every repository's tags, and
 * queues each REPO:TAG the rules take whose manifest is neither queued nor
 * converted yet (a `sha256-<hex>.shoal` tag in the destination repository: done by
 * hand, or before the state was lost). Pushes the registry never announced (it
 * was down, or its in-memory notification queue was lost in a restart) are
 * converted this way.
 */
export async function syncRegistry (options: { registry: string, access: RegistryAccess, queue: JobQueue, rules: RuleSet, signal?: AbortSignal, onLine?: (line: SyncLine) => void }): Promise<SyncReport> {
  const { registry, queue, rules } = options
  const so = options.signal !== undefined ? { signal: options.signal } : {}
  const client = await openRegistryClient(registry, '', options.access)
  const report: SyncReport = { repositories: 0, tags: 0, queued: 0, converted: 0, duplicate: 0, ignored: 0 }
  const say = (line: SyncLine): void => { options.onLine?.(line) }
  try {
    for (const repository of await client.listRepositories(so)) {
      report.repositories++
      for (const tag of await client.listTags(repository, so)) {
        report.tags++
        const image = `${registry}/${repository}:${tag}`
        const decision = rules.decide(repository, tag)
        if (!decision.convert) { report.ignored++; say({ image, outcome: 'ignored', why: decision.why }); continue }
        let desc
        try { desc = await client.resolveManifest(repository, tag, so) } catch (err) {
          if (err instanceof NotFoundError) continue // deleted while we walked
          throw err
        }
        const known = queue.find(registry, repository, desc.digest)
        if (known !== undefined) {
          const r = queuePush(queue, rules, { registry, repository, tag, digest: desc.digest }, 'sync')
          if (r.outcome === 'new-name') { report.queued++; say({ image, outcome: 'queued', why: `another name for job ${known.id}` }) } else { report.duplicate++; say({ image, outcome: 'duplicate', why: `job ${known.id} is ${known.state}` }) }
          continue
        }
        const single = desc.mediaType !== MediaType.ociIndex && desc.mediaType !== MediaType.dockerManifestList
        if (single && await client.resolveManifest(decision.destRepository, conversionTag(desc.digest), so).then(() => true, (err: unknown) => {
          if (err instanceof NotFoundError) return false
          throw err
        })) { report.converted++; say({ image, outcome: 'converted' }); continue }
        queuePush(queue, rules, { registry, repository, tag, digest: desc.digest }, 'sync')
        report.queued++
        say({ image, outcome: 'queued' })
      }
    }
  } finally {
    client.close()
  }
  return report
}
