/**
 * A containerd snapshotter with the semantics of containerd's overlay snapshotter
 * (snapshots/overlay in containerd 1.6), plus remote layers the way
 * stargz-snapshotter does them: a Prepare naming a target layer
 * (`containerd.io/snapshot.ref`) that a RemoteLayers implementation can mount is
 * answered with a committed snapshot of that name and ALREADY_EXISTS, so
 * containerd skips downloading and unpacking the layer.
 *
 * Metadata lives in MetaStore (SQLite), contents in SnapshotDirs. A snapshot's
 * directory is made before its record and removed after it, so a crash leaves at
 * most a directory without a record, which Cleanup removes.
 */
import { access, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { ShoalError } from '../errors.ts'
import { errorText, silentLogger, type Logger } from '../util/log.ts'
import { diskUsage } from './disk-usage.ts'
import { SnapshotArgumentError, SnapshotExistsError, SnapshotStateError, SnapshotterClosedError } from './errors.ts'
import { parseFilters } from './filters.ts'
import { KeyedLock } from './keyed-lock.ts'
import type { RemoteLayer, RemoteLayers } from './remote-layers.ts'
import { SnapshotDirs } from './snapshot-dirs.ts'
import { MetaStore, type SnapshotRecord } from './store.ts'
import { Kind, kindName, TARGET_SNAPSHOT_LABEL, type Mount, type SnapshotInfo, type Usage } from './types.ts'

export interface SnapshotterOptions {
  /** Holds metadata.db and snapshots/<id>/{fs,work}. */
  root: string
  /** Serves layers without a download; without it this is a plain overlay snapshotter. */
  remote?: RemoteLayers
  log?: Logger
  /** Bounds `open`'s remounting of remote layers. */
  signal?: AbortSignal
}

export interface CallOptions { signal?: AbortSignal }

/** containerd's limit (labels.Validate): key and value together at most 4 KiB. */
const MAX_LABEL_BYTES = 4096

export class Snapshotter {
  private readonly store: MetaStore
  private readonly dirs: SnapshotDirs
  private readonly remote: RemoteLayers | undefined
  private readonly log: Logger
  /** overlay's `index=off` is passed only where the kernel knows the option (as containerd does). */
  private readonly indexOff: boolean
  /** Ids whose directories are being made or deleted: not orphans, whatever Cleanup reads on disk. */
  private readonly busy = new Set<number>()
  private readonly targets = new KeyedLock()
  private readonly closing = new AbortController()
  private readonly inflight = new Set<Promise<unknown>>()
  private closed: Promise<void> | undefined

  private constructor (store: MetaStore, dirs: SnapshotDirs, options: SnapshotterOptions, indexOff: boolean) {
    this.store = store
    this.dirs = dirs
    this.remote = options.remote
    this.log = options.log ?? silentLogger
    this.indexOff = indexOff
  }

  /** Opens (or creates) the snapshotter at `root` and mounts its remote layers again. */
  static async open (options: SnapshotterOptions): Promise<Snapshotter> {
    const dirs = await SnapshotDirs.init(options.root)
    const store = MetaStore.open(join(dirs.root, 'metadata.db'))
    const indexOff = await overlayHasIndexOption()
    const snapshotter = new Snapshotter(store, dirs, options, indexOff)
    try {
      await snapshotter.restoreRemoteLayers(options.signal)
    } catch (err) {
      await snapshotter.close()
      throw err
    }
    return snapshotter
  }

  /**
   * Creates active snapshot `key` on `parent` ('' for none) and returns its mounts.
   * With a target label and a remote layer for it, creates the committed target
   * instead and throws SnapshotExistsError, which tells containerd the layer is there.
   */
  async prepare (key: string, parent: string, labels: Record<string, string>, options: CallOptions = {}): Promise<Mount[]> {
    return await this.run(options, async signal => {
      checkName('key', key)
      checkLabels(labels)
      const target = labels[TARGET_SNAPSHOT_LABEL]
      if (this.remote !== undefined && target !== undefined && target !== '') {
        if (await this.prepareRemote(this.remote, { key, parent, target, labels }, signal)) {
          throw new SnapshotExistsError(`target snapshot "${target}" already exists: the layer is served by shoal without a download`)
        }
      }
      return await this.create(Kind.Active, key, parent, labels)
    })
  }

  /** Creates read-only view `key` of `parent` ('' for an empty one) and returns its mounts. */
  async view (key: string, parent: string, labels: Record<string, string>, options: CallOptions = {}): Promise<Mount[]> {
    return await this.run(options, async () => {
      checkName('key', key)
      checkLabels(labels)
      return await this.create(Kind.View, key, parent, labels)
    })
  }

  /** The mounts of an active or view snapshot, again. */
  async mounts (key: string, options: CallOptions = {}): Promise<Mount[]> {
    return await this.run(options, async () => {
      const record = this.store.require(key)
      if (record.kind === Kind.Committed) throw new SnapshotStateError(`snapshot "${key}" is committed; only active and view snapshots have mounts (prepare or view a child of it)`)
      return this.mountsOf(record)
    })
  }

  /** Commits active snapshot `key` as `name`, measuring its upper dir for Usage. */
  async commit (name: string, key: string, labels: Record<string, string>, options: CallOptions = {}): Promise<void> {
    await this.run(options, async signal => {
      checkName('name', name)
      checkLabels(labels)
      const active = this.store.require(key)
      if (active.kind !== Kind.Active) throw new SnapshotStateError(`cannot commit "${key}": it is a ${kindName(active.kind)} snapshot, only active ones can be committed`)
      const usage = await diskUsage(this.dirs.fsDir(active.id), { signal })
      this.store.commit({ key, name, labels, usage, id: active.id })
    })
  }

  /**
   * Removes snapshot `key` (refused while it has children). Its record goes first;
   * its directory after, and a failure there is only logged, as in containerd:
   * the key is gone either way, and Cleanup retries the directory.
   */
  async remove (key: string, options: CallOptions = {}): Promise<void> {
    await this.run(options, async () => {
      const record = this.store.remove(key)
      this.busy.add(record.id)
      try {
        await this.discard(record.id, record.remote !== undefined)
      } finally {
        this.busy.delete(record.id)
      }
    })
  }

  async stat (key: string, options: CallOptions = {}): Promise<SnapshotInfo> {
    return await this.run(options, async () => toInfo(this.store.require(key)))
  }

  /** Changes labels (the only mutable field); see MetaStore.updateLabels for `paths`. */
  async update (info: { name: string, labels: Record<string, string> }, paths: string[], options: CallOptions = {}): Promise<SnapshotInfo> {
    return await this.run(options, async () => {
      checkName('name', info.name)
      checkLabels(info.labels)
      return toInfo(this.store.updateLabels(info.name, info.labels, paths))
    })
  }

  /** Snapshots matching any of `filters` (containerd filter syntax); all of them when a filter is not understood. */
  async list (filters: string[], options: CallOptions = {}): Promise<SnapshotInfo[]> {
    return await this.run(options, async () => {
      const matches = parseFilters(filters)
      if (matches === undefined) this.log.debug({ filters }, 'snapshot filter not understood; listing every snapshot (containerd filters the answer again)')
      const infos = this.store.all().map(toInfo)
      return matches === undefined ? infos : infos.filter(matches)
    })
  }

  /** Active snapshots: the upper dir now. Committed: as measured at commit. Views: nothing of their own. */
  async usage (key: string, options: CallOptions = {}): Promise<Usage> {
    return await this.run(options, async signal => {
      const record = this.store.require(key)
      if (record.kind === Kind.Active) return await diskUsage(this.dirs.fsDir(record.id), { signal })
      return record.usage
    })
  }

  /** Removes snapshot directories that no record names (left by a crash or a failed removal). */
  async cleanup (options: CallOptions = {}): Promise<void> {
    await this.run(options, async signal => {
      const names = await this.dirs.names()
      // Read in one synchronous step after the listing: a directory made since is busy or recorded.
      const known = this.store.ids()
      const orphans = names.filter(name => {
        const id = Number(name)
        return !(String(id) === name && (known.has(id) || this.busy.has(id)))
      })
      for (const name of orphans) {
        signal.throwIfAborted()
        try {
          // A remote layer whose record is gone (removed while the agent was down, or a failed unmount).
          if (this.remote !== undefined && await this.dirs.isMounted(name)) await this.remote.release(this.dirs.fsDir(name))
          await this.dirs.remove(name)
          this.log.info({ dir: this.dirs.dir(name) }, 'removed orphaned snapshot directory')
        } catch (err) {
          this.log.warn({ dir: this.dirs.dir(name), err: errorText(err) }, 'cannot remove orphaned snapshot directory')
        }
      }
    })
  }

  /**
   * Stops: aborts calls in progress, waits for them, unmounts every remote layer
   * (their records stay, and `open` mounts them again) and closes the database.
   */
  async close (): Promise<void> {
    this.closed ??= (async () => {
      this.closing.abort(new SnapshotterClosedError())
      await Promise.allSettled([...this.inflight])
      if (this.remote !== undefined) {
        const remote = this.remote
        await Promise.all(this.store.all().filter(r => r.remote !== undefined).map(async record => {
          await remote.release(this.dirs.fsDir(record.id)).catch((err: unknown) => {
            this.log.warn({ snapshot: record.name, err: errorText(err) }, 'cannot unmount remote layer')
          })
        }))
      }
      this.store.close()
    })()
    await this.closed
  }

  /** Runs a call unless closed, with a signal that also fires on close, and tracks it for close. */
  private async run<T> (options: CallOptions, fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.closed !== undefined) throw new SnapshotterClosedError()
    const signal = options.signal === undefined ? this.closing.signal : AbortSignal.any([options.signal, this.closing.signal])
    const call = fn(signal)
    this.inflight.add(call)
    try {
      return await call
    } finally {
      this.inflight.delete(call)
    }
  }

  private async create (kind: Kind, key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    if (this.store.get(key) !== undefined) throw new SnapshotExistsError(`snapshot "${key}" already exists`)
    const parentRecord = parent === '' ? undefined : this.store.requireParent(parent)
    // Like containerd: the new root directory belongs to whoever owns the parent's.
    const owner = parentRecord === undefined ? undefined : await stat(this.dirs.fsDir(parentRecord.id)).catch((err: unknown) => {
      throw new ShoalError('ESNAPSHOT_UNREADABLE', `parent snapshot "${parent}" cannot be read (${errorText(err)})${parentRecord.remote !== undefined ? '; it is a remote layer whose mount may have died: restart the shoal agent' : ''}`, { cause: err })
    })
    const id = this.store.reserveId()
    this.busy.add(id)
    try {
      await this.dirs.create(id, { work: kind === Kind.Active, owner })
      // Validates again: the key or parent may have changed while the directories were made.
      return this.mountsOf(this.store.insert({ id, name: key, kind, parent, labels }))
    } catch (err) {
      await this.discard(id, false)
      throw err
    } finally {
      this.busy.delete(id)
    }
  }

  /**
   * The remote path of Prepare, one at a time per target. True when the committed
   * target exists (made now, or earlier with the same parent); false when containerd
   * should get an ordinary active snapshot and download the layer.
   */
  private async prepareRemote (remote: RemoteLayers, request: { key: string, parent: string, target: string, labels: Record<string, string> }, signal: AbortSignal): Promise<boolean> {
    const { key, parent, target, labels } = request
    return await this.targets.run(target, async () => {
      const existing = this.store.get(target)
      if (existing !== undefined) {
        if (existing.kind === Kind.Committed && existing.parent === parent) return true
        // containerd would look for the target on this very parent and not find it.
        this.log.warn({ target, parent, existingParent: existing.parent, kind: kindName(existing.kind) }, 'a snapshot named after the target layer exists on another parent; preparing an ordinary snapshot')
        return false
      }
      if (this.store.get(key) !== undefined) throw new SnapshotExistsError(`snapshot "${key}" already exists`)
      if (parent !== '') this.store.requireParent(parent)
      const id = this.store.reserveId()
      const dir = this.dirs.fsDir(id)
      this.busy.add(id)
      try {
        await this.dirs.create(id, { work: false })
        let layer: RemoteLayer | undefined
        try {
          layer = await remote.prepare({ key, parent, target, labels, dir }, { signal })
        } catch (err) {
          if (signal.aborted) throw err
          this.log.warn({ target, key, err: errorText(err) }, 'remote layer failed to prepare; containerd will download it')
        }
        if (layer === undefined) {
          await this.discard(id, true)
          return false
        }
        // Recorded even if the caller gave up meanwhile: the mount is made, and containerd's GC removes unused snapshots.
        this.store.insert({ id, name: target, kind: Kind.Committed, parent, labels, usage: { size: layer.size, inodes: layer.inodes }, remote: layer.state })
        this.log.info({ target, key, parent, dir }, 'prepared remote layer')
        return true
      } catch (err) {
        await this.discard(id, true)
        throw err
      } finally {
        this.busy.delete(id)
      }
    }, signal)
  }

  /** Deletes directory `id` (after unmounting its remote layer); failures are logged for Cleanup to retry. */
  private async discard (id: number, remote: boolean): Promise<void> {
    try {
      if (remote && this.remote !== undefined) await this.remote.release(this.dirs.fsDir(id))
      await this.dirs.remove(id)
    } catch (err) {
      this.log.warn({ dir: this.dirs.dir(id), err: errorText(err) }, 'cannot remove snapshot directory; Cleanup will retry')
    }
  }

  /** Mounts as containerd's overlay snapshotter returns them. */
  private mountsOf (record: SnapshotRecord): Mount[] {
    const lowers = this.store.chain(record.id).slice(1).map(id => this.dirs.fsDir(id))
    if (lowers.length === 0) {
      // Overlay needs a lower layer; a lone layer is its directory, bound.
      return [{ type: 'bind', source: this.dirs.fsDir(record.id), options: [record.kind === Kind.View ? 'ro' : 'rw', 'rbind'] }]
    }
    if (record.kind === Kind.View && lowers.length === 1) {
      return [{ type: 'bind', source: lowers[0]!, options: ['ro', 'rbind'] }]
    }
    const options = this.indexOff ? ['index=off'] : []
    if (record.kind === Kind.Active) options.push(`workdir=${this.dirs.workDir(record.id)}`, `upperdir=${this.dirs.fsDir(record.id)}`)
    options.push(`lowerdir=${lowers.join(':')}`)
    return [{ type: 'overlay', source: 'overlay', options }]
  }

  /** Mounts every recorded remote layer again (agent restart); a failure leaves the record for containerd's GC. */
  private async restoreRemoteLayers (signal: AbortSignal | undefined): Promise<void> {
    const records = this.store.all().filter(r => r.kind === Kind.Committed && r.remote !== undefined)
    await Promise.all(records.map(async record => {
      const dir = this.dirs.fsDir(record.id)
      try {
        if (this.remote === undefined) throw new Error('no remote layer provider is configured')
        // No mkdir here: after a crash DIR is the dead mount of the previous process, which restore clears.
        await this.remote.restore(record.remote!, dir, { signal })
      } catch (err) {
        signal?.throwIfAborted()
        this.log.warn({ snapshot: record.name, dir, err: errorText(err) }, 'cannot mount remote layer again; containers using it will fail until containerd removes it')
      }
    }))
  }
}

/**
 * Whether overlay takes `index=off`. containerd asks the loaded module's parameters;
 * a module not loaded yet (nothing has mounted an overlay since boot) would lose
 * the option for good that way, so then assume it: kernels have it since 4.13.
 */
async function overlayHasIndexOption (): Promise<boolean> {
  const exists = async (path: string): Promise<boolean> => await access(path).then(() => true, () => false)
  if (!await exists('/sys/module/overlay')) return true
  return await exists('/sys/module/overlay/parameters/index')
}

function toInfo (record: SnapshotRecord): SnapshotInfo {
  return { name: record.name, parent: record.parent, kind: record.kind, labels: record.labels, created: record.created, updated: record.updated }
}

function checkName (what: string, name: string): void {
  if (name === '') throw new SnapshotArgumentError(`the snapshot ${what} is empty`)
}

function checkLabels (labels: Record<string, string>): void {
  for (const [key, value] of Object.entries(labels)) {
    if (Buffer.byteLength(key) + Buffer.byteLength(value) > MAX_LABEL_BYTES) {
      throw new SnapshotArgumentError(`label "${key.slice(0, 64)}" is too long: key and value must be at most ${MAX_LABEL_BYTES} bytes together`)
    }
  }
}
