import { UsageError } from '../errors.ts'

/**
 * Image references in the containers-transports syntax (containers-transports(5)),
 * the one skopeo, podman and buildah users already type.
 */
export type ImageReference =
  | { transport: 'oci', dir: string, tag: string }
  | { transport: 'oci-archive', file: string, tag?: string }
  | { transport: 'docker', registry: string, repository: string, tag?: string, digest?: string }

const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/

export function parseReference (text: string): ImageReference {
  const colon = text.indexOf(':')
  if (colon < 0) throw new UsageError(`image reference "${text}" has no transport: write oci:DIR:TAG, oci-archive:FILE or docker://HOST/REPO:TAG`)
  const transport = text.slice(0, colon)
  const rest = text.slice(colon + 1)
  switch (transport) {
    case 'oci': {
      // The tag follows the last colon, unless that colon belongs to the path (oci:DIR with no tag).
      const [dir, tag] = splitTag(rest)
      if (dir === '') throw new UsageError(`image reference "${text}" has no directory: write oci:DIR:TAG`)
      return { transport: 'oci', dir, tag: tag ?? 'latest' }
    }
    case 'oci-archive': {
      const [file, tag] = splitTag(rest)
      if (file === '') throw new UsageError(`image reference "${text}" has no file: write oci-archive:FILE[:TAG]`)
      return tag === undefined ? { transport: 'oci-archive', file } : { transport: 'oci-archive', file, tag }
    }
    case 'docker': {
      if (!rest.startsWith('//')) throw new UsageError(`image reference "${text}": write docker://HOST/REPO:TAG`)
      const name = rest.slice(2)
      const slash = name.indexOf('/')
      if (slash <= 0) throw new UsageError(`image reference "${text}" names no registry host: write docker://HOST/REPO:TAG`)
      const registry = name.slice(0, slash)
      let repository = name.slice(slash + 1)
      let digest: string | undefined
      const at = repository.indexOf('@')
      if (at >= 0) { digest = repository.slice(at + 1); repository = repository.slice(0, at) }
      let tag: string | undefined
      const lastColon = repository.lastIndexOf(':')
      if (lastColon >= 0) { tag = repository.slice(lastColon + 1); repository = repository.slice(0, lastColon) }
      if (repository === '') throw new UsageError(`image reference "${text}" names no repository`)
      return { transport: 'docker', registry, repository, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) }
    }
    default:
      throw new UsageError(`unknown transport "${transport}" in "${text}": shoal reads oci:DIR:TAG, oci-archive:FILE and docker://HOST/REPO:TAG`)
  }
}

function splitTag (rest: string): [string, string | undefined] {
  const colon = rest.lastIndexOf(':')
  if (colon < 0) return [rest, undefined]
  const tag = rest.slice(colon + 1)
  if (!TAG_RE.test(tag)) throw new UsageError(`"${tag}" is not a valid tag (letters, digits, "_", "." and "-", at most 128)`)
  return [rest.slice(0, colon), tag]
}

export function formatReference (ref: ImageReference): string {
  switch (ref.transport) {
    case 'oci': return `oci:${ref.dir}:${ref.tag}`
    case 'oci-archive': return `oci-archive:${ref.file}${ref.tag !== undefined ? ':' + ref.tag : ''}`
    case 'docker': return `docker://${ref.registry}/${ref.repository}${ref.tag !== undefined ? ':' + ref.tag : ''}${ref.digest !== undefined ? '@' + ref.digest : ''}`
  }
}

/**
 * An image name as containerd and kubelet write it (`python:3`, `library/python`,
 * `127.0.0.1:5000/team/app@sha256:…`), normalized as docker does: no registry means
 * Docker Hub, a Hub name without a slash is under `library/`.
 */
export function parseImageName (name: string): ImageReference & { transport: 'docker' } {
  const slash = name.indexOf('/')
  const first = slash < 0 ? '' : name.slice(0, slash)
  const hasRegistry = first !== '' && (first.includes('.') || first.includes(':') || first === 'localhost')
  let rest = hasRegistry ? name.slice(slash + 1) : name
  const registry = hasRegistry ? first : 'docker.io'
  if (registry === 'docker.io' && !rest.includes('/')) rest = `library/${rest}`
  return parseReference(`docker://${registry}/${rest}`) as ImageReference & { transport: 'docker' }
}
