import type { KeyObject } from 'node:crypto'
import { FormatError, IntegrityError, NotFoundError, OriginError, SignatureError, UsageError } from '../errors.ts'
import { errorText, type Logger } from '../util/log.ts'
import type { ChunkResolver } from '../fetch/resolver.ts'
import { Catalog } from '../format/catalog.ts'
import { parseDigest, sha256, type Digest } from '../oci/digest.ts'
import { mountImage, type MountedImage } from '../fs/mount.ts'
import { imageName as signedName } from '../format/signing.ts'
import { fetchCatalogFile } from '../image/catalog-files.ts'
import { loadImage, type BlobFetcher, type LoadedImage } from '../image/load-image.ts'
import { MergedView } from '../image/merged-view.ts'
import { prefetchChunks } from '../image/prefetch-list.ts'
import { isTagName, RollbackError, type RollbackGuard } from '../image/rollback-guard.ts'
import { conversionTag } from '../oci/conversion-tags.ts'
import { parseImageName } from '../oci/reference.ts'
import { RegistryOrigin } from '../origin/registry-origin.ts'
import type { RoutedOrigin } from '../origin/routed-origin.ts'
import type { RegistryAccess } from '../registry/client.ts'
import type { AbortOptions, RemoteLayer, RemoteLayers, RemoteLayerState } from '../snapshotter/remote-layers.ts'
import { LAZY_LAYER_DEFAULTS } from './constants.ts'

/** The labels containerd's CRI plugin puts on each layer's Prepare (with disable_snapshot_annotations = false). */
export const CRI_LABELS = {
  imageRef: 'containerd.io/snapshot/cri.image-ref',
  manifestDigest: 'containerd.io/snapshot/cri.manifest-digest',
  layerDigest: 'containerd.io/snapshot/cri.layer-digest'
} as const

/** Why a layer was left to containerd to download. */
export type FallbackReason = 'no-image-labels' | 'no-conversion' | 'signature' | 'rollback' | 'invalid-conversion' | 'layer-not-converted' | 'chain-mismatch' | 'unauthorized' | 'unreachable' | 'timeout' | 'mount-failed' | 'error'

export interface LazyLayerStats {
  /** Layers mounted lazily now. */
  mounted: number
  /** Bytes read through the lazy layers' FUSE mounts since start. */
  bytesRead: number
  /** Layers served lazily since start (restores included). */
  lazy: number
  /** Layers left to containerd, by reason. */
  fallbacks: Partial<Record<FallbackReason, number>>
}

/** What a lazily mounted layer needs to be mounted again after a restart (persisted by the snapshotter). */
interface LayerState extends RemoteLayerState {
  /** `docker://HOST/REPO`: where the conversion and its blobs are. */
  repository: string
  /** The signed shoal image this layer comes from. */
  image: Digest
  catalog: { digest: Digest, size: number }
  packs: Digest[]
}

export interface LazyLayerParts {
  trusted: KeyObject[]
  /** Where verified catalog files live (the agent's, so that peers can be served from them). */
  catalogDir: string
  /** CA file and plain-HTTP choice for registries; credentials come from the docker/podman auth files. */
  registry: RegistryAccess
  /** Each mounted layer routes its blobs here, to its own registry. */
  origin: RoutedOrigin
  resolver: ChunkResolver
  /** The agent's shared fetch of whole blobs (cache, peers, origin), verified. */
  fetchBlob: BlobFetcher
  /** The agent's record of the highest signed version seen per image name; without it, no rollback check. */
  guard?: RollbackGuard
  /** Joins the layer's swarm (its catalog digest) for its packs. */
  joinSwarm: (key: Digest, packs: Digest[]) => void
  /** A new catalog is on disk: serve peers from it. */
  catalogAdded: () => Promise<void>
  /** Told of each layer's outcome, for metrics. */
  onOutcome?: (outcome: 'lazy' | 'fallback', reason?: FallbackReason) => void
  log: Logger
}

/**
 * shoal's remote layers for the containerd snapshotter. For a layer of an image that
 * a pod names (CRI labels: image reference, manifest digest, layer digest), it finds
 * the shoal conversion in the image's own repository under the digest tag, checks
 * its signature and that the conversion says it was made from exactly that manifest,
 * finds the layer by its source blob digest, checks the layer's chainID against the
 * one containerd asks for, and mounts that layer alone through FUSE as an overlayfs
 * lower directory. Its chunks then come through the agent's resolver like any
 * mount's. Whatever goes wrong, the answer is "not remote": containerd downloads the
 * layer as usual, and the reason is logged and counted.
 */
export class LazyLayers implements RemoteLayers {
  private readonly counts = { lazy: 0, fallbacks: {} as LazyLayerStats['fallbacks'], releasedBytesRead: 0 }
  private readonly parts: LazyLayerParts
  private readonly mounts = new Map<string, { mounted: MountedImage, catalog: Catalog }>()
  /** Conversions looked up lately, by `HOST/NAME@manifest`: the layers of one pull share one lookup. */
  private readonly conversions = new Map<string, { at: number, found: Promise<{ origin: RegistryOrigin, image: LoadedImage }> }>()
  private readonly origins = new Map<string, Promise<RegistryOrigin>>()

  constructor (parts: LazyLayerParts) {
    this.parts = parts
  }

  stats (): LazyLayerStats {
    let bytesRead = this.counts.releasedBytesRead
    for (const m of this.mounts.values()) bytesRead += m.mounted.stats.bytesRead
    return { mounted: this.mounts.size, bytesRead, lazy: this.counts.lazy, fallbacks: { ...this.counts.fallbacks } }
  }

  async prepare (request: { key: string, parent: string, target: string, labels: Record<string, string>, dir: string }, options: AbortOptions = {}): Promise<RemoteLayer | undefined> {
    const { labels } = request
    const imageName = labels[CRI_LABELS.imageRef]
    const manifest = labels[CRI_LABELS.manifestDigest]
    const layerDigest = labels[CRI_LABELS.layerDigest]
    if (imageName === undefined || manifest === undefined || layerDigest === undefined) {
      return this.fallback('no-image-labels', request, 'containerd passed no CRI image labels: pull through the CRI plugin with disable_snapshot_annotations = false')
    }
    const signal = AbortSignal.any([AbortSignal.timeout(LAZY_LAYER_DEFAULTS.prepareTimeoutMs), ...(options.signal !== undefined ? [options.signal] : [])])
    let found: { origin: RegistryOrigin, image: LoadedImage }
    try {
      found = await this.conversion(imageName, parseDigest(manifest, 'cri.manifest-digest'), signal)
    } catch (err) {
      return this.fallback(classify(err), request, errorText(err))
    }
    const layers = found.image.config.layers
    const index = layers.findIndex(l => l.sourceDigest === layerDigest)
    if (index < 0) return this.fallback('layer-not-converted', request, `the conversion ${found.image.manifestDigest} has no layer made from ${layerDigest}`)
    const chain = chainId(layers.slice(0, index + 1).map(l => l.diffId))
    if (chain !== request.target) return this.fallback('chain-mismatch', request, `layer ${index} of the conversion has chainID ${chain}, containerd asks for ${request.target}`)
    const layer = layers[index]!
    const state: LayerState = { repository: found.origin.name, image: found.image.manifestDigest, catalog: layer.catalog, packs: layer.packs.map(p => p.digest) }
    try {
      await this.mount(state, request.dir, found.origin, signal)
    } catch (err) {
      return this.fallback(signal.aborted ? 'timeout' : 'mount-failed', request, errorText(err))
    }
    this.counts.lazy++
    this.parts.onOutcome?.('lazy')
    this.parts.log.info({ image: imageName, layer: layerDigest, chainId: request.target, conversion: found.image.manifestDigest, dir: request.dir }, 'layer mounted lazily')
    return { state, size: layer.contentBytes, inodes: layer.files }
  }

  async restore (state: RemoteLayerState, dir: string, options: AbortOptions = {}): Promise<void> {
    const s = parseState(state)
    await this.mount(s, dir, await this.registryOrigin(s.repository), options.signal)
    this.counts.lazy++
    this.parts.onOutcome?.('lazy')
  }

  async release (dir: string): Promise<void> {
    const m = this.mounts.get(dir)
    if (m === undefined) return
    await m.mounted.unmount()
    m.catalog.close()
    this.mounts.delete(dir)
    this.counts.releasedBytesRead += m.mounted.stats.bytesRead
  }

  private async mount (state: LayerState, dir: string, origin: RegistryOrigin, signal?: AbortSignal): Promise<void> {
    if (this.mounts.has(dir)) return
    const p = this.parts
    p.origin.route([state.catalog.digest, ...state.packs], origin)
    const path = await fetchCatalogFile(origin, { ...state.catalog, group: state.image }, p.catalogDir, signal, p.fetchBlob)
    p.joinSwarm(state.catalog.digest, state.packs)
    await p.catalogAdded()
    const catalog = new Catalog(path)
    try {
      signal?.throwIfAborted()
      // No signal for the mount itself: it lives until release, not until this request ends.
      const mounted = await mountImage({ mountpoint: dir, view: new MergedView([catalog], { overlayLower: true }), resolver: p.resolver, log: p.log })
      this.mounts.set(dir, { mounted, catalog })
    } catch (err) {
      catalog.close()
      throw err
    }
  }

  /** The signed conversion of IMAGE's manifest MANIFEST, from IMAGE's own repository. */
  private async conversion (imageName: string, manifest: Digest, signal: AbortSignal): Promise<{ origin: RegistryOrigin, image: LoadedImage }> {
    const ref = parseImageName(imageName)
    // The name the pod asked for, as the signature must name it: REPO:TAG (no registry host, so a
    // mirror host is the same name), or REPO@DIGEST for a pinned digest (repository checked only).
    const name = ref.digest !== undefined ? `${ref.repository}@${ref.digest}` : signedName(ref.repository, ref.tag ?? 'latest', ref.registry)
    const key = `${ref.registry}/${name}@${manifest}`
    const cached = this.conversions.get(key)
    if (cached !== undefined && Date.now() - cached.at < LAZY_LAYER_DEFAULTS.conversionTtlMs) return await cached.found
    const found = (async () => {
      const origin = await this.registryOrigin(`docker://${ref.registry}/${ref.repository}`)
      // Metadata goes through the agent's shared fetch (peers first), routed to this registry.
      const fetchBlob: BlobFetcher = async (blob, s) => {
        this.parts.origin.route([blob.digest], origin)
        return await this.parts.fetchBlob(blob, s)
      }
      const image = await loadImage(origin, conversionTag(manifest), { trusted: this.parts.trusted, signal, fetchBlob, expectName: name, image: `docker://${ref.registry}/${ref.repository}:${conversionTag(manifest)}` })
      // The tag is the registry's word; the signed config is the converter's: it must name this very manifest.
      if (image.config.source.manifestDigest !== manifest) {
        throw new IntegrityError(`conversion ${image.manifestDigest}`, `was made from ${image.config.source.manifestDigest}, not ${manifest} (tag ${conversionTag(manifest)} points to the wrong image)`)
      }
      if (this.parts.guard !== undefined && isTagName(name)) await this.parts.guard.accept(name, image.signature!.version, image.manifestDigest)
      this.prefetch(origin, image)
      return { origin, image }
    })()
    this.conversions.set(key, { at: Date.now(), found })
    found.catch(() => this.conversions.delete(key))
    return await found
  }

  /**
   * A conversion's recorded start-up reads (`shoal trace`), fetched in the background
   * from the first Prepare of its image on: containerd still prepares the other layers,
   * the sandbox and the container, and the container's first reads then find them
   * cached instead of going to the registry one miss at a time.
   */
  private prefetch (origin: RegistryOrigin, image: LoadedImage): void {
    const entries = image.config.prefetch
    if (entries.length === 0) return
    const p = this.parts
    const signal = AbortSignal.timeout(LAZY_LAYER_DEFAULTS.prefetchTimeoutMs)
    void (async () => {
      const layers = image.config.layers
      for (const l of layers) p.origin.route([l.catalog.digest, ...l.packs.map(pack => pack.digest)], origin)
      // The list names paths of the merged image, so every layer's catalog is needed (each layer's Prepare fetches it anyway).
      const paths = await Promise.all(layers.map(async l => await fetchCatalogFile(origin, { ...l.catalog, group: image.manifestDigest }, p.catalogDir, signal, p.fetchBlob)))
      const catalogs = paths.map(path => new Catalog(path))
      try {
        const chunks = prefetchChunks(new MergedView(catalogs), entries)
        const result = await p.resolver.prefetch(chunks, { signal })
        p.log.info({ image: image.manifestDigest, ...result }, 'prefetch list fetched')
      } finally {
        for (const c of catalogs) c.close()
      }
    })().catch((err: unknown) => p.log.warn({ image: image.manifestDigest, err: errorText(err) }, 'prefetch list not fetched'))
  }

  private async registryOrigin (repository: string): Promise<RegistryOrigin> {
    let origin = this.origins.get(repository)
    if (origin === undefined) {
      const host = repository.slice('docker://'.length).split('/')[0]!
      // Like containerd: plain HTTP for the local machine only, unless configured for all.
      const access: RegistryAccess = {
        ...(this.parts.registry.caFile !== undefined ? { caFile: this.parts.registry.caFile } : {}),
        plainHttp: this.parts.registry.plainHttp === true || isLocalHost(host)
      }
      origin = RegistryOrigin.open(repository, access, LAZY_LAYER_DEFAULTS.registryRetry)
      origin.catch(() => this.origins.delete(repository))
      this.origins.set(repository, origin)
    }
    return await origin
  }

  private fallback (reason: FallbackReason, request: { target: string, labels: Record<string, string> }, why: string): undefined {
    this.counts.fallbacks[reason] = (this.counts.fallbacks[reason] ?? 0) + 1
    this.parts.onOutcome?.('fallback', reason)
    this.parts.log.warn({ reason, image: request.labels[CRI_LABELS.imageRef], layer: request.labels[CRI_LABELS.layerDigest], chainId: request.target, why }, 'layer not lazy: containerd downloads it')
    return undefined
  }
}

/** containerd's chainID: the first diffID, then sha256("<chain> <diffID>") for each layer above. */
export function chainId (diffIds: Digest[]): Digest {
  let chain = diffIds[0]!
  for (const d of diffIds.slice(1)) chain = sha256(Buffer.from(`${chain} ${d}`))
  return chain
}

function classify (err: unknown): FallbackReason {
  if (err instanceof NotFoundError) return 'no-conversion'
  if (err instanceof RollbackError) return 'rollback'
  if (err instanceof SignatureError) return 'signature'
  if (err instanceof IntegrityError || err instanceof FormatError) return 'invalid-conversion'
  if (err instanceof OriginError) return err.status === 401 || err.status === 403 ? 'unauthorized' : 'unreachable'
  if (err instanceof UsageError) return 'unreachable'
  if (err instanceof Error && (err.name === 'TimeoutError' || err.name === 'AbortError')) return 'timeout'
  return 'error'
}

function isLocalHost (host: string): boolean {
  const name = host.startsWith('[') ? host.slice(1, host.indexOf(']')) : host.replace(/:\d+$/, '')
  return name === 'localhost' || name === '127.0.0.1' || name === '::1'
}

function parseState (state: RemoteLayerState): LayerState {
  const s = state as Partial<LayerState>
  if (typeof s.repository !== 'string' || !s.repository.startsWith('docker://') || s.catalog === undefined || !Array.isArray(s.packs)) {
    throw new FormatError(`a lazily mounted layer's record is damaged (${JSON.stringify(state).slice(0, 200)}); remove the image and pull it again`)
  }
  return {
    repository: s.repository,
    image: parseDigest(s.image, 'layer record image'),
    catalog: { digest: parseDigest(s.catalog.digest, 'layer record catalog'), size: Number(s.catalog.size) },
    packs: s.packs.map(p => parseDigest(p, 'layer record pack'))
  }
}
