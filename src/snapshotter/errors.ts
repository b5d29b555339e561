import { ShoalError } from '../errors.ts'

/**
 * The snapshotter's typed errors. Each stands for one of the error classes that
 * containerd's snapshotters share (errdefs), because containerd acts on the class:
 * "already exists" after a Prepare with a target means "the layer is ready", "not
 * found" lets garbage collection carry on. service.ts maps them to gRPC codes.
 */

/** No snapshot (or parent) by that name. gRPC NOT_FOUND. */
export class SnapshotNotFoundError extends ShoalError {
  constructor (message: string) {
    super('ESNAPSHOT_NOT_FOUND', message)
    this.name = 'SnapshotNotFoundError'
  }
}

/** A snapshot by that name exists already (or a remote layer was prepared instead). gRPC ALREADY_EXISTS. */
export class SnapshotExistsError extends ShoalError {
  constructor (message: string) {
    super('ESNAPSHOT_EXISTS', message)
    this.name = 'SnapshotExistsError'
  }
}

/** The snapshot is in the wrong state for this (not active, has children). gRPC FAILED_PRECONDITION. */
export class SnapshotStateError extends ShoalError {
  constructor (message: string) {
    super('ESNAPSHOT_STATE', message)
    this.name = 'SnapshotStateError'
  }
}

/** The request itself is wrong (empty key, immutable field, parent not committed). gRPC INVALID_ARGUMENT. */
export class SnapshotArgumentError extends ShoalError {
  constructor (message: string) {
    super('ESNAPSHOT_ARGUMENT', message)
    this.name = 'SnapshotArgumentError'
  }
}

/** The snapshotter was closed (the agent is shutting down). gRPC UNAVAILABLE: containerd may retry later. */
export class SnapshotterClosedError extends ShoalError {
  constructor () {
    super('ESNAPSHOTTER_CLOSED', 'the snapshotter is shutting down; try again when the shoal agent is back')
    this.name = 'SnapshotterClosedError'
  }
}
