/**
 * The snapshotter's own vocabulary, shared by the store, the snapshotter and the
 * gRPC service. Kind numbers are those of snapshots.proto's Kind enum, so they
 * go to the wire and into the database unchanged.
 */

export const Kind = { View: 1, Active: 2, Committed: 3 } as const
export type Kind = typeof Kind[keyof typeof Kind]

/** What Stat, Update and List report about a snapshot (containerd's snapshots.Info). */
export interface SnapshotInfo {
  name: string
  /** The parent's name; '' for none. */
  parent: string
  kind: Kind
  labels: Record<string, string>
  created: Date
  updated: Date
}

/** Disk usage: bytes allocated (blocks × 512) and distinct inodes, hard links counted once. */
export interface Usage { size: number, inodes: number }

/** One mount for containerd to make (containerd.types.Mount). */
export interface Mount { type: string, source: string, options: string[] }

/** The label by which containerd names the layer (chainID) a Prepare is for. */
export const TARGET_SNAPSHOT_LABEL = 'containerd.io/snapshot.ref'

export function kindName (kind: Kind): string {
  return kind === Kind.View ? 'view' : kind === Kind.Active ? 'active' : 'committed'
}
