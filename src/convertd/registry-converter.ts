import type { KeyObject } from 'node:crypto'
import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { convertImage } from '../convert/convert.ts'
import { NotFoundError } from '../errors.ts'
import { isDigest, type Digest } from '../oci/digest.ts'
import { imageName, loadPrivateKey } from '../format/signing.ts'
import { signImage } from '../image/sign-image.ts'
import { conversionTag } from '../oci/conversion-tags.ts'
import { MediaType, type ImageIndex, type ImageManifest } from '../oci/types.ts'
import { openRegistryClient, type RegistryAccess } from '../registry/client.ts'
import type { ConversionOutcome, Converter, Job } from './types.ts'

/**
 * Converts one job registry to registry with shoal's own convert and push: layers
 * stream from the registry (memory bounded by the converter's few chunks in flight),
 * the converted image is staged in WORKDIR/job-ID (removed after, and emptied on
 * every start, so a killed conversion leaves nothing behind), then pushed blobs
 * first, the signature, and the tags last (src/registry/push.ts): a tag never names
 * a half-written image, whenever the process dies.
 */
export class RegistryConverter implements Converter {
  private readonly keys = new Map<string, Promise<KeyObject>>()

  private readonly options: { access: RegistryAccess, workDir: string }

  constructor (options: { access: RegistryAccess, workDir: string }) {
    this.options = options
  }

  async convert (job: Job, { signal, onProgress }: { signal: AbortSignal, onProgress: (bytesIn: number, bytesTotal: number) => void }): Promise<ConversionOutcome> {
    const client = await openRegistryClient(job.registry, job.repository, this.options.access)
    let manifest: { mediaType?: string, artifactType?: string, config?: { mediaType?: string }, manifests?: ImageIndex['manifests'] }
    let mediaType: string
    try {
      const got = await client.getManifest(job.repository, job.digest, { signal })
      mediaType = got.descriptor.mediaType
      manifest = JSON.parse(Buffer.from(got.bytes).toString('utf8')) as typeof manifest
      if (mediaType === MediaType.ociIndex || mediaType === MediaType.dockerManifestList) {
        const platforms = (manifest.manifests ?? []).flatMap(m => {
          // Attestation manifests (buildx) carry platform unknown/unknown: there is nothing to run.
          if (m.platform === undefined || m.platform.os === 'unknown' || !isDigest(m.digest)) return []
          if (m.mediaType !== MediaType.ociManifest && m.mediaType !== MediaType.dockerManifest) return []
          const { os, architecture, variant } = m.platform
          return [{ digest: m.digest, platform: { os, architecture, ...(variant !== undefined ? { variant } : {}) } }]
        })
        return { kind: 'index', platforms }
      }
      const artifact = (manifest as ImageManifest).artifactType ?? manifest.config?.mediaType
      if (artifact === MediaType.shoalImage || artifact === MediaType.shoalSignature || artifact === MediaType.shoalConfig) {
        return { kind: 'skipped', reason: 'a shoal artifact, not an image to convert' }
      }
      // Converted before (by a run killed after its last tag, by hand, or by a service whose state was lost):
      // the digest tag is written last, so it means done, and later tags of the image are signed on that conversion.
      const existing = await client.resolveManifest(job.destRepository, conversionTag(job.digest), { signal }).catch((err: unknown) => {
        if (err instanceof NotFoundError) return undefined
        throw err
      })
      if (existing !== undefined) return { kind: 'converted', result: existing.digest, bytesIn: 0, bytesOut: 0, note: `already converted: ${conversionTag(job.digest)} was there` }
    } finally {
      client.close()
    }

    const staging = join(this.options.workDir, `job-${job.id}`)
    await rm(staging, { recursive: true, force: true })
    await mkdir(staging, { recursive: true, mode: 0o700 })
    try {
      const source = `docker://${job.registry}/${job.repository}@${job.digest}`
      const dest = `docker://${job.registry}/${job.destRepository}:${job.destTag}`
      let bytesTotal = 0
      const report = await convertImage({
        source,
        dest,
        signingKey: await this.key(job.key),
        signing: {
          // The name pods use (the source tag) and the converted tag's own.
          names: [...new Set([imageName(job.repository, job.tag, job.registry), imageName(job.destRepository, job.destTag, job.registry)])],
          ...(job.lifetimeMs !== undefined ? { lifetimeMs: job.lifetimeMs } : {})
        },
        ...(job.platform !== undefined ? { platform: job.platform } : {}),
        sourceRegistry: this.options.access,
        destRegistry: this.options.access,
        stagingDir: staging,
        signal,
        onProgress: p => { bytesTotal = p.bytesTotal; onProgress(p.bytesRead, p.bytesTotal) }
      })
      return { kind: 'converted', result: report.manifestDigest, bytesIn: bytesTotal, bytesOut: report.push?.uploadedBytes ?? 0 }
    } finally {
      await rm(staging, { recursive: true, force: true })
    }
  }

  async addName (job: Job & { result: Digest }, destTag: string, names: string[], { signal }: { signal: AbortSignal }): Promise<void> {
    // Signed first, tagged after: the new tag never names an image not yet signed for it.
    await signImage(`docker://${job.registry}/${job.destRepository}@${job.result}`, await this.key(job.key), {
      names,
      access: this.options.access,
      ...(job.lifetimeMs !== undefined ? { lifetimeMs: job.lifetimeMs } : {})
    })
    const client = await openRegistryClient(job.registry, job.destRepository, this.options.access)
    try {
      const { descriptor, bytes } = await client.getManifest(job.destRepository, job.result, { signal })
      await client.putManifest(job.destRepository, destTag, bytes, descriptor.mediaType, { signal })
    } finally {
      client.close()
    }
  }

  private async key (path: string): Promise<KeyObject> {
    let key = this.keys.get(path)
    if (key === undefined) {
      key = loadPrivateKey(path)
      key.catch(() => this.keys.delete(path))
      this.keys.set(path, key)
    }
    return await key
  }
}
