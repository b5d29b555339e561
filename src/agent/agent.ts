import type { KeyObject } from 'node:crypto'
import { chmod, lstat, mkdir, readdir, readFile, stat } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { NotFoundError, UsageError } from '../errors.ts'
import { CACHE_MODES, DiskCache, ownerOnlyDir, type DiskCacheStats } from '../cache/disk-cache.ts'
import { MemoryCache } from '../cache/memory-cache.ts'
import { OriginChunkSource } from '../fetch/chunk-source.ts'
import { silentLogger, type Logger } from '../util/log.ts'
import { ChunkResolver, type PrefetchResult, type ResolverStats } from '../fetch/resolver.ts'
import { loadPublicKey } from '../format/signing.ts'
import { mountImage, type MountedImage } from '../fs/mount.ts'
import { cleanStaleMount } from '../fs/stale-mount.ts'
import { openImageView, type ImageView } from '../image/image-view.ts'
import { inPackOrder, prefetchChunks } from '../image/prefetch-list.ts'
import { isTagName, mountName, RollbackGuard } from '../image/rollback-guard.ts'
import { watchExpiry, type MountedSignature } from '../image/signature-expiry.ts'
import { writeAtomic } from '../util/files.ts'
import { FailoverOrigin, openOrigin } from '../origin/open-origin.ts'
import type { Origin } from '../origin/origin.ts'
import type { RuntimeConfig } from '../oci/types.ts'
import { sleep } from '../util/limit.ts'
import { RangeReader } from '../origin/range-reader.ts'
import { RoutedOrigin } from '../origin/routed-origin.ts'
import { backgroundFetch, type BackgroundFetchResult } from './background-fetch.ts'
import { MOUNT_FETCH_DEFAULTS } from './constants.ts'
import type { LazyLayers, LazyLayerStats } from './lazy-layers.ts'
import type { BlobFetcher } from '../image/load-image.ts'
import type { AgentConfig } from './config.ts'
import { controlSocketPath, startControlServer } from './control.ts'
import type { AgentMetrics } from './metrics.ts'
import type { Peering, PeeringStats } from './peering.ts'
import { EventLoopLag, type LoopLagSummary } from '../p2p/loop-lag.ts'
import { resolverStore } from '../p2p/local-chunks.ts'
import type { ChunkRef } from '../format/catalog.ts'
import { ChunkIndex, wholeBlobChunk } from './chunk-index.ts'
import { Parts } from './parts.ts'

export interface MountInfo {
  image: string
  /** The image's runtime config (env, entrypoint, cmd, workdir, user), for `shoal run`. */
  runtime: RuntimeConfig
  manifestDigest: string
  mountpoint: string
  mountedAt: string
  /** The signature verified at mount; `expired` once it expired while mounted (the mount keeps serving: src/image/signature-expiry.ts). */
  signature: MountedSignature
  /** Reads through this mount. */
  fs: { opens: number, reads: number, bytesRead: number, readErrors: number }
  /** The image's prefetch list, fetched right after mount (`shoal run` waits for its first 64 MiB before starting the container). */
  prefetch: { chunks: number, result?: PrefetchResult }
  /** With `backgroundFetch`: the rest of the image streamed into the cache once the start-up reads were served. */
  background?: BackgroundFetchResult
  /** Chunks and bytes this image's reads got, by source (memory, disk, peers, origin). */
  sources: Record<string, { chunks: number, bytes: number }>
}

export interface AgentStats {
  stateDir: string
  metricsUrl: string | undefined
  /** Chunks and bytes by the source that produced them: memory, disk, peers, origin. */
  sources: ResolverStats['sources']
  verificationFailures: ResolverStats['verificationFailures']
  unavailable: number
  cache: DiskCacheStats & { maxBytes: number }
  mounts: MountInfo[]
  /** Present when peer-to-peer is on: this node's id, addresses, peers, and what it got from and served to them. */
  peer?: PeeringStats
  /** How late the agent's event loop ran since start (a starved agent answers its peers late). */
  eventLoop: LoopLagSummary
  /** What this node may serve its peers: the catalogs indexed, their chunks, and whole blobs (metadata, catalogs). */
  index: ChunkIndex['stats']
  /** Present when the agent serves containerd: layers mounted lazily, and those left to containerd, by reason. */
  snapshotter?: LazyLayerStats
}

/** What the agent is built from (Agent.assemble). */
interface AgentParts {
  origin: Origin
  disk: DiskCache
  index: ChunkIndex
  resolver: ChunkResolver
  trusted: KeyObject[]
  log: Logger
  loop: EventLoopLag
  fetchBlob: BlobFetcher
  mounts: Map<string, ActiveMount>
  metricsUrl: string | undefined
  peering: Peering | undefined
  lazyLayers: LazyLayers | undefined
  parts: Parts
}

interface ActiveMount { info: Omit<MountInfo, 'fs' | 'prefetch' | 'sources' | 'background'>, view: ImageView, mounted: MountedImage, prefetch: MountInfo['prefetch'], sources: MountInfo['sources'], lifetime: AbortController, background?: BackgroundFetchResult }

/**
 * The per-node daemon: one chunk resolver (memory → disk → peers → origin) and one
 * disk cache shared by every image it mounts, a chunk index of what it may serve to
 * peers, a control socket, metrics. `Agent.start` assembles the parts in order.
 */
export class Agent {
  readonly config: AgentConfig
  readonly resolver: ChunkResolver
  readonly origin: Origin
  /** Every chunk and whole blob a verified catalog of this node names: what peers may be served. */
  readonly index: ChunkIndex
  readonly metricsUrl: string | undefined
  readonly peering: Peering | undefined
  readonly lazyLayers: LazyLayers | undefined
  private readonly disk: DiskCache
  private readonly trusted: KeyObject[]
  private readonly log: Logger
  private readonly loop: EventLoopLag
  private readonly fetchBlob: BlobFetcher
  private readonly parts: Parts
  private readonly mounts: Map<string, ActiveMount>
  /** Mount points with a mount in progress: two requests for one path must not both mount it. */
  private readonly mounting = new Set<string>()

  private constructor (config: AgentConfig, parts: AgentParts) {
    this.config = config
    this.origin = parts.origin
    this.disk = parts.disk
    this.index = parts.index
    this.resolver = parts.resolver
    this.trusted = parts.trusted
    this.log = parts.log
    this.loop = parts.loop
    this.fetchBlob = parts.fetchBlob
    this.mounts = parts.mounts
    this.metricsUrl = parts.metricsUrl
    this.peering = parts.peering
    this.lazyLayers = parts.lazyLayers
    this.parts = parts.parts
  }

  /**
   * Starts an agent. With `control: false` no socket is opened (an agent embedded in
   * `shoal run` for one command).
   */
  static async start (config: AgentConfig, options: { log?: Logger, control?: boolean } = {}): Promise<Agent> {
    const log = options.log ?? silentLogger
    await ownerOnlyStateDir(config.stateDir)
    const trusted = await Promise.all(config.trust.map(loadPublicKey))
    const origins = await Promise.all(config.origins.map(o => openOrigin(o, { registry: config.registry, redirectHosts: config.redirectHosts })))
    const configured = origins.length === 0 ? undefined : origins.length === 1 ? origins[0]! : new FailoverOrigin(origins)
    // Serving containerd, each image comes from the registry its pod names: blobs are routed per image.
    const origin = config.snapshotterSocket !== '' ? new RoutedOrigin(configured) : configured!
    const parts = new Parts(log)
    try {
      const agent = await Agent.assemble(config, { log, trusted, origin, parts, control: options.control !== false })
      log.info({ stateDir: config.stateDir, origins: config.origins, metrics: agent.metricsUrl, parts: parts.names }, 'agent started')
      return agent
    } catch (err) {
      await parts.stop()
      throw err
    }
  }

  /**
   * The one place a node's parts are built and started, in order; each is built
   * from the parts before it (nothing refers to a part that does not exist yet) and
   * registered in PARTS with its closer, which `stop` (or a failure here) runs in
   * reverse order. The chunk server starts once the resolver exists: it fetches
   * through it for peers, and the resolver asks peers through the peer source.
   */
  private static async assemble (config: AgentConfig, o: { log: Logger, trusted: KeyObject[], origin: Origin, parts: Parts, control: boolean }): Promise<Agent> {
    const { log, parts, origin } = o
    const loop = await parts.start('event-loop lag', () => new EventLoopLag(), l => { l.close() })
    const disk = await parts.start('disk cache', async () => await DiskCache.open({ dir: join(config.stateDir, 'cache'), maxBytes: config.cacheBytes, log }), async d => { await d.close() })
    await tightenStateFiles(config.stateDir)
    const index = await parts.start('chunk index', async () => {
      const i = new ChunkIndex({ catalogDir: join(config.stateDir, 'catalogs'), log })
      // The index says what this node may serve to peers: without peers it stays empty
      // (reading every catalog's chunk list cost a `shoal run` tens of ms per mount).
      if (config.p2p.enabled) await i.scan()
      return i
    }, async i => { await i.close() })
    // libp2p (and, below, gRPC for containerd) is loaded only by agents that use it:
    // about a third of a second of every `shoal run --no-p2p` (docs/BENCHMARKS.md).
    const peering = config.p2p.enabled
      ? await parts.start('peering', async () => await (await import('./peering.ts')).Peering.start(config, { locator: index, log, lag: loop }), async p => { await p.stop() })
      : undefined
    const mounts = new Map<string, ActiveMount>()
    // prom-client (and node:http's ES namespace) is loaded only when metrics are served:
    // tens of ms of every `shoal run`, which serves none.
    const metrics = config.metrics !== ''
      ? await parts.start('metrics', async () => {
        const m = new (await import('./metrics.ts')).AgentMetrics({
          cacheBytes: () => disk.stats.bytes,
          cacheChunks: () => disk.stats.chunks,
          evictions: () => disk.stats.evictions,
          mounts: () => mounts.size,
          expiredMounts: () => [...mounts.values()].filter(m => m.info.signature.expired).length,
          peers: () => peering?.node.connectedPeers().length ?? 0
        })
        return { hooks: m, server: await m.listen(config.metrics) }
      }, async ({ server }) => { await server.close() })
      : undefined
    const resolver = new ChunkResolver({
      disk,
      memory: new MemoryCache(config.memoryBytes),
      remote: [...(peering !== undefined ? [peering.source] : []), new OriginChunkSource(new RangeReader({ origin, maxGap: MOUNT_FETCH_DEFAULTS.rangeMaxGapBytes }))],
      timeoutMs: config.chunkTimeoutMs,
      prefetchConcurrency: MOUNT_FETCH_DEFAULTS.prefetchConcurrency,
      ...(metrics !== undefined ? { onEvent: metrics.hooks.onResolverEvent } : {}),
      log
    })
    if (peering !== undefined) await parts.start('chunk server', async () => { await peering.serve(resolverStore(resolver, disk)) }, async () => { await peering.stopServing() })
    const fetchBlob = sharedBlobFetcher({ index, resolver, peering, timeoutMs: config.chunkTimeoutMs })
    // Built before the agent (it needs nothing of it); serving containerd starts after the mounts.
    const containerd = config.snapshotterSocket !== '' && origin instanceof RoutedOrigin
      ? await lazyLayersFor(config, { origin, resolver, fetchBlob, index, peering, trusted: o.trusted, onOutcome: metrics?.hooks.onLayerOutcome, log })
      : undefined
    const agent = new Agent(config, { origin, disk, index, resolver, trusted: o.trusted, log, loop, fetchBlob, mounts, metricsUrl: metrics?.server.url, peering, lazyLayers: containerd?.lazy, parts })
    // Mounts left by a killed agent are cleared first; on stop, every mount is unmounted.
    await parts.start('mounts', async () => { await agent.cleanUpAfterCrash() }, async () => { await agent.unmountAll() })
    if (containerd !== undefined) {
      const snapshotter = await parts.start('snapshotter', async () => await containerd.Snapshotter.open({ root: join(config.stateDir, 'snapshotter'), remote: containerd.lazy, log }), async s => { await s.close() })
      await parts.start('snapshotter socket', async () => await containerd.serveSnapshotter(snapshotter, config.snapshotterSocket, { log }), async s => { await s.close() })
    }
    if (o.control) await parts.start('control socket', async () => await startControlServer(controlSocketPath(config.stateDir), async (method, path, body) => await agent.handleControl(method, path, body)), async c => { await c.close() })
    return agent
  }

  /**
   * Mounts IMAGE (a tag or digest at the origin) read-only at MOUNTPOINT, after
   * checking its signature. `signal` bounds the set-up only; the mount then lives
   * until `umount` or `stop`. With `prefetchFirst` it returns once the image's prefetch
   * list is fetched, or its first MOUNT_FETCH_DEFAULTS.prefetchWaitBytes, or after
   * prefetchWaitMs: a container started then finds its start-up reads cached instead of
   * fetching them one miss at a time.
   */
  async mount (image: string, mountpoint: string, options: { signal?: AbortSignal, prefetchFirst?: boolean, onRead?: (path: string, offset: number, length: number) => void } = {}): Promise<MountInfo> {
    const path = resolve(mountpoint)
    const existing = this.mounts.get(path)
    if (existing !== undefined) throw new UsageError(`${path} is already a shoal mount (of ${existing.info.image}); unmount it first`)
    if (this.mounting.has(path)) throw new UsageError(`${path} is being mounted by another request`)
    this.mounting.add(path)
    try {
      // Signed for the name asked (REPO:TAG of the registry origin, or the tag), and no older than what this agent saw for it.
      const name = mountName(this.config.origins, image)
      const view = await openImageView(this.origin, image, {
        trusted: this.trusted,
        catalogDir: join(this.config.stateDir, 'catalogs'),
        fetchBlob: this.fetchBlob,
        expectName: name,
        accept: async loaded => { if (isTagName(name)) await RollbackGuard.forStateDir(this.config.stateDir).accept(name, loaded.signature!.version, loaded.manifestDigest) },
        ...(options.signal !== undefined ? { signal: options.signal } : {})
      })
      // A layer's packs are in the swarm of its catalog's digest (shared by every image with the layer).
      for (const layer of view.image.config.layers) this.peering?.join(layer.catalog.digest, layer.packs.map(p => p.digest))
      const sources: MountInfo['sources'] = {}
      const lifetime = new AbortController()
      // When a read last waited for a remote source: background fetch waits for quiet.
      let lastMiss = -Infinity
      let mounted: MountedImage
      try {
        // Before the FUSE mount: peers in the same burst may already ask us for this image's chunks.
        // (The view's catalogs are in layer order, checked against their digests when fetched.)
        if (this.peering !== undefined) await Promise.all(view.image.config.layers.map(async (layer, i) => { await this.index.addCatalog(layer.catalog.digest, view.view.catalogs[i]!, layer.catalog.size) }))
        options.signal?.throwIfAborted()
        mounted = await mountImage({
          mountpoint: path,
          view: view.view,
          resolver: this.resolver,
          log: this.log,
          signal: lifetime.signal,
          readaheadChunks: MOUNT_FETCH_DEFAULTS.readaheadChunks,
          onServed: (source, bytes) => {
            if (source !== 'memory' && source !== 'disk') lastMiss = performance.now()
            const s = (sources[source] ??= { chunks: 0, bytes: 0 })
            s.chunks++
            s.bytes += bytes
          },
          ...(options.onRead !== undefined ? { onRead: options.onRead } : {})
        })
      } catch (err) {
        view.close()
        throw err
      }
      const signed = view.image.signature!
      const info = { image, runtime: view.image.config.runtime, manifestDigest: view.image.manifestDigest, mountpoint: path, mountedAt: new Date().toISOString(), signature: { version: signed.version, expires: signed.expires, expired: false } }
      watchExpiry(signed.expires, lifetime.signal, () => {
        info.signature.expired = true
        this.log.warn({ mountpoint: path, image, version: signed.version, expires: signed.expires }, `the signature of mounted image ${image} expired; the mount keeps serving what it verified, but the image will not mount again (not after a restart either) until it is re-signed: shoal sign ${image} --key KEY`)
      })
      // The recorded start-up reads: the first prefetchWaitBytes of them (in the order they
      // were read), then the rest, each part all at once in pack order: the resolver's
      // background budget keeps many in flight and the RangeReader merges neighbours in a pack.
      const chunks = prefetchChunks(view.view, view.image.config.prefetch)
      let cut = 0
      for (let bytes = 0; cut < chunks.length && bytes < MOUNT_FETCH_DEFAULTS.prefetchWaitBytes; cut++) bytes += chunks[cut]!.length
      const active: ActiveMount = { info, view, mounted, prefetch: { chunks: chunks.length }, sources, lifetime }
      this.mounts.set(path, active)
      const fetchPart = async (part: ChunkRef[]): Promise<PrefetchResult> => await this.resolver.prefetch(inPackOrder(part), { signal: lifetime.signal })
      const startup = fetchPart(chunks.slice(0, cut))
      const prefetched = startup.then(async first => {
        const rest = await fetchPart(chunks.slice(cut))
        if (chunks.length === 0) return
        active.prefetch.result = { requested: first.requested + rest.requested, cached: first.cached + rest.cached, resolved: first.resolved + rest.resolved, failed: first.failed + rest.failed }
        this.log.info({ mountpoint: path, ...active.prefetch.result }, 'prefetch list fetched')
      })
      if (this.config.backgroundFetch) {
        void backgroundFetch({
          catalogs: view.view.catalogs,
          prefetch: async (list, o) => await this.resolver.prefetch(list, o),
          sinceLastMiss: () => performance.now() - lastMiss,
          signal: lifetime.signal,
          startAfter: prefetched
        }).then(result => {
          active.background = result
          this.log.info({ mountpoint: path, ...result }, 'background fetch done')
        }, (err: unknown) => this.log.warn({ mountpoint: path, err: (err as Error).message }, 'background fetch failed'))
      }
      await this.saveMounts()
      if (options.prefetchFirst === true && chunks.length > 0) {
        // Bounded, and given up on with the set-up's signal: the mount is made either way.
        const stopWaiting = new AbortController()
        const waitSignal = options.signal !== undefined ? AbortSignal.any([stopWaiting.signal, options.signal]) : stopWaiting.signal
        try {
          await Promise.race([cut < chunks.length ? startup : prefetched, sleep(MOUNT_FETCH_DEFAULTS.prefetchWaitMs, waitSignal).catch(() => {})])
        } finally {
          stopWaiting.abort()
        }
      }
      this.log.info(info, 'mounted')
      return this.describe(active)
    } finally {
      this.mounting.delete(path)
    }
  }

  async umount (mountpoint: string): Promise<void> {
    const path = resolve(mountpoint)
    const m = this.mounts.get(path)
    if (m === undefined) throw new NotFoundError(`${path} is not mounted by this agent (see shoal ls)`)
    // Forgotten only once really unmounted: a mount that refuses stays listed (and recorded for crash cleanup).
    await m.mounted.unmount()
    m.lifetime.abort()
    this.mounts.delete(path)
    m.view.close()
    await this.saveMounts()
    this.log.info({ mountpoint: path }, 'unmounted')
  }

  list (): MountInfo[] {
    return [...this.mounts.values()].map(m => this.describe(m))
  }

  private describe (m: ActiveMount): MountInfo {
    return { ...m.info, fs: { ...m.mounted.stats }, prefetch: structuredClone(m.prefetch), sources: structuredClone(m.sources), ...(m.background !== undefined ? { background: { ...m.background } } : {}) }
  }

  stats (): AgentStats {
    const r = this.resolver.stats
    return {
      stateDir: this.config.stateDir,
      metricsUrl: this.metricsUrl,
      sources: structuredClone(r.sources),
      verificationFailures: { ...r.verificationFailures },
      unavailable: r.unavailable,
      cache: { ...this.disk.stats, maxBytes: this.disk.maxBytes },
      mounts: this.list(),
      eventLoop: this.loop.summary(),
      index: this.index.stats,
      ...(this.peering !== undefined ? { peer: this.peering.stats() } : {}),
      ...(this.lazyLayers !== undefined ? { snapshotter: this.lazyLayers.stats() } : {})
    }
  }

  /** Stops every part, the last started first: sockets, the snapshotter, mounts, the chunk server, metrics, libp2p, the index, the cache. */
  async stop (): Promise<void> {
    await this.parts.stop()
  }

  /** The mounts part's closer. A mount that refuses to go stays recorded in mounts.json for the next start to clean up. */
  private async unmountAll (): Promise<void> {
    for (const path of [...this.mounts.keys()]) {
      await this.umount(path).catch((err: Error) => this.log.error({ mountpoint: path, err: err.message }, 'unmount failed'))
    }
  }

  private async handleControl (method: string, path: string, body: unknown): Promise<unknown> {
    const b = (body ?? {}) as { image?: unknown, mountpoint?: unknown, prefetchFirst?: unknown }
    if (method === 'GET' && path === '/v1/stats') return this.stats()
    if (method === 'GET' && path === '/v1/mounts') return this.list()
    if (method === 'POST' && path === '/v1/mounts') {
      if (typeof b.image !== 'string' || typeof b.mountpoint !== 'string') throw new UsageError('mount needs an image and a mountpoint')
      return await this.mount(b.image, b.mountpoint, { signal: AbortSignal.timeout(MOUNT_FETCH_DEFAULTS.mountTimeoutMs), prefetchFirst: b.prefetchFirst === true })
    }
    if (method === 'DELETE' && path === '/v1/mounts') {
      if (typeof b.mountpoint !== 'string') throw new UsageError('umount needs a mountpoint')
      await this.umount(b.mountpoint)
      return { unmounted: resolve(b.mountpoint) }
    }
    throw new NotFoundError(`unknown control call ${method} ${path}`)
  }

  /** Mount points are recorded so that an agent killed with -9 can clean them up on restart. */
  private async saveMounts (): Promise<void> {
    await writeAtomic(join(this.config.stateDir, 'mounts.json'), JSON.stringify([...this.mounts.keys()]), { mode: CACHE_MODES.file })
  }

  private async cleanUpAfterCrash (): Promise<void> {
    const file = join(this.config.stateDir, 'mounts.json')
    const previous = await readFile(file, 'utf8').then(t => JSON.parse(t) as string[], () => [])
    for (const path of previous) {
      if (await cleanStaleMount(path)) this.log.warn({ mountpoint: path }, 'cleaned a mount left by a previous agent')
    }
    await writeAtomic(file, '[]', { mode: CACHE_MODES.file })
  }
}

/**
 * The state dir holds image contents (the chunk cache, catalogs, the snapshotter's
 * layers), the peer key and the control socket: its owner's alone (issue 15: an
 * existing dir was left 0755, so any local user could read cached image files).
 * Created 0700, tightened to 0700 if it exists, and refused if another user owns
 * it (they could loosen it again).
 */
async function ownerOnlyStateDir (dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: CACHE_MODES.dir })
  const st = await stat(dir)
  if (!st.isDirectory()) throw new UsageError(`state dir ${dir} is not a directory; pass --state with a directory (default /var/lib/shoal)`)
  const uid = process.getuid?.()
  if (uid !== undefined && st.uid !== uid) throw new UsageError(`state dir ${dir} belongs to uid ${st.uid}, not to the agent's uid ${uid}; chown it to the agent's user or pass another --state`)
  await chmod(dir, CACHE_MODES.dir)
}

/**
 * What this agent keeps directly in the state dir, made root-only when an older
 * version left it looser: the catalogs dir (0700) and its files, mounts.json and the
 * peer key (0600). The 0700 state dir already keeps everyone else out; this is in
 * case it is ever opened up (a hostPath recreated by kubelet as 0755, a careless chmod).
 */
async function tightenStateFiles (dir: string): Promise<void> {
  const catalogs = join(dir, 'catalogs')
  await ownerOnlyDir(catalogs)
  const files = [join(dir, 'mounts.json'), join(dir, 'peer.key'), ...(await readdir(catalogs)).map(name => join(catalogs, name))]
  for (const file of files) {
    const st = await lstat(file).catch(() => undefined)
    if (st?.isFile() === true && (st.mode & 0o077) !== 0) await chmod(file, CACHE_MODES.file)
  }
}

/**
 * Whole blobs (metadata, catalogs) through the resolver like a chunk, verified by
 * their digest: in a burst, peers share them too, instead of every node asking the
 * origin. A blob is named servable as soon as a verified descriptor asks for it, so
 * a parent asked for it fetches it rather than answer dont-have.
 */
function sharedBlobFetcher (p: { index: ChunkIndex, resolver: ChunkResolver, peering: Peering | undefined, timeoutMs: number }): BlobFetcher {
  return async (blob, signal) => {
    p.index.addWholeBlob(blob)
    p.peering?.join(blob.group, [blob.digest])
    return await p.resolver.get(wholeBlobChunk(blob), { signal: signal ?? AbortSignal.timeout(p.timeoutMs) })
  }
}

/**
 * containerd's side (loaded only when configured): the lazy layers over this node's
 * resolver (src/agent/lazy-layers.ts), and the snapshotter modules that serve them.
 */
async function lazyLayersFor (config: AgentConfig, p: { origin: RoutedOrigin, resolver: ChunkResolver, fetchBlob: BlobFetcher, index: ChunkIndex, peering: Peering | undefined, trusted: KeyObject[], onOutcome: AgentMetrics['onLayerOutcome'] | undefined, log: Logger }): Promise<{ lazy: LazyLayers, Snapshotter: typeof import('../snapshotter/snapshotter.ts').Snapshotter, serveSnapshotter: typeof import('../snapshotter/service.ts').serveSnapshotter }> {
  const [{ LazyLayers }, { Snapshotter }, { serveSnapshotter }] = await Promise.all([import('./lazy-layers.ts'), import('../snapshotter/snapshotter.ts'), import('../snapshotter/service.ts')])
  const lazy = new LazyLayers({
    trusted: p.trusted,
    catalogDir: join(config.stateDir, 'catalogs'),
    registry: config.registry,
    origin: p.origin,
    resolver: p.resolver,
    fetchBlob: p.fetchBlob,
    guard: RollbackGuard.forStateDir(config.stateDir),
    joinSwarm: (key, packs) => p.peering?.join(key, packs),
    catalogAdded: async () => { await p.index.scan() },
    onOutcome: p.onOutcome,
    log: p.log
  })
  return { lazy, Snapshotter, serveSnapshotter }
}
