/**
 * The boundary between the snapshotter (containerd's Snapshots API, overlay
 * semantics, durable metadata) and whatever can serve a layer without
 * containerd downloading it (shoal's lazy FUSE layers). The snapshotter owns
 * the directories and the records; a RemoteLayers implementation only mounts
 * into a directory it is given and unmounts it again.
 */

export interface AbortOptions { signal?: AbortSignal }

/** What a remote layer needs to be mounted again after a restart; stored by the snapshotter as JSON. */
export type RemoteLayerState = Record<string, unknown>

export interface RemoteLayer {
  /** Persisted with the committed snapshot; handed back to `restore` on start. */
  state: RemoteLayerState
  /** The layer's content in bytes and inodes, for Usage. */
  size: number
  inodes: number
}

export interface RemoteLayers {
  /**
   * Called by Prepare when containerd names a target (`containerd.io/snapshot.ref`,
   * the layer's chainID). Mounts the layer read-only at `dir` (an empty directory)
   * and resolves with what to persist, or resolves undefined when this layer is not
   * to be served remotely (no conversion, bad signature, unreachable registry: the
   * implementation logs and counts why), in which case the snapshotter carries on as
   * an ordinary one and containerd downloads the layer.
   */
  prepare (request: { key: string, parent: string, target: string, labels: Record<string, string>, dir: string }, options?: AbortOptions): Promise<RemoteLayer | undefined>
  /**
   * Mounts a layer again at `dir` from what `prepare` returned (agent restart). After a
   * crash `dir` may still hold the previous process's dead mount (ENOTCONN on every
   * access): the implementation clears it first.
   */
  restore (state: RemoteLayerState, dir: string, options?: AbortOptions): Promise<void>
  /** Unmounts what `prepare` or `restore` mounted at `dir` (snapshot removed, or shutdown). Idempotent. */
  release (dir: string): Promise<void>
}
