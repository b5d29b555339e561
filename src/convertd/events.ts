import { isDigest, type Digest } from '../oci/digest.ts'
import { MediaType } from '../oci/types.ts'
import { FormatError } from '../errors.ts'

/**
 * docker-registry's (distribution 2.x) notification envelopes: `{"events": [...]}`,
 * one event per blob or manifest pushed, pulled or deleted. A push of a manifest or
 * an index *by tag* is what convertd acts on; manifests pushed by digest alone are
 * the platform manifests of an index (skopeo and docker push those first, then the
 * index by tag) and are reached through the index.
 */
export interface ManifestPush {
  repository: string
  tag: string
  digest: Digest
  mediaType: string
  /** The Host the pushing client used: the registry's address, unless convertd is told another. */
  host?: string
}

export type EventVerdict = { push: ManifestPush } | { ignored: 'not-a-push' | 'not-a-manifest' | 'untagged' }

const MANIFEST_TYPES = new Set<string>([MediaType.ociManifest, MediaType.ociIndex, MediaType.dockerManifest, MediaType.dockerManifestList])

interface RawEvent {
  action?: unknown
  target?: { mediaType?: unknown, digest?: unknown, repository?: unknown, tag?: unknown }
  request?: { host?: unknown }
}

/** The events of an envelope, each a manifest push to act on or the reason it is ignored. */
export function parseEnvelope (body: Uint8Array): EventVerdict[] {
  let value: unknown
  try { value = JSON.parse(Buffer.from(body).toString('utf8')) } catch (err) {
    throw new FormatError(`the notification body is not JSON: ${(err as Error).message}`)
  }
  const events = (value as { events?: unknown } | null)?.events
  if (!Array.isArray(events)) throw new FormatError('the notification body has no "events" list: is this a docker-registry notification envelope?')
  return events.map((e: RawEvent): EventVerdict => {
    if (e?.action !== 'push') return { ignored: 'not-a-push' }
    const t = e.target ?? {}
    if (typeof t.mediaType !== 'string' || !MANIFEST_TYPES.has(t.mediaType)) return { ignored: 'not-a-manifest' }
    if (typeof t.tag !== 'string' || t.tag === '') return { ignored: 'untagged' }
    if (typeof t.repository !== 'string' || !isDigest(t.digest)) throw new FormatError('a manifest push event lacks target.repository or target.digest')
    const host = e.request?.host
    return { push: { repository: t.repository, tag: t.tag, digest: t.digest, mediaType: t.mediaType, ...(typeof host === 'string' && host !== '' ? { host } : {}) } }
  })
}
