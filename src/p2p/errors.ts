import { ShoalError } from '../errors.ts'

/**
 * Errors of the peer layer. None of them reaches FUSE: the peer chunk source
 * turns every peer failure into "not available from peers" and the resolver
 * falls back to the origin. They exist so that logs, counters and tests can tell
 * a hostile peer from a slow or dead one.
 */

/**
 * A peer broke the chunk protocol: an oversized or malformed frame, an unknown
 * message, a reused request id. The stream is reset; we never try to resync.
 */
export class ProtocolViolationError extends ShoalError {
  constructor (message: string) {
    super('EP2PPROTOCOL', `chunk protocol violation: ${message}`)
    this.name = 'ProtocolViolationError'
  }
}

/** The peer could not be reached, or its stream closed before it answered. */
export class PeerUnavailableError extends ShoalError {
  readonly peer: string
  constructor (peer: string, reason: string, options?: { cause?: unknown }) {
    super('EPEERUNAVAILABLE', `peer ${peer} is unavailable: ${reason}`, options)
    this.name = 'PeerUnavailableError'
    this.peer = peer
  }
}

/** The pre-shared swarm key file is missing pieces or is not in the swarm.key v1 format. */
export class SwarmKeyError extends ShoalError {
  constructor (file: string, problem: string) {
    super('ESWARMKEY', `swarm key ${file}: ${problem}`)
    this.name = 'SwarmKeyError'
  }
}

/** The persisted peer identity key cannot be used (unreadable, corrupt, or readable by others). */
export class PeerKeyError extends ShoalError {
  constructor (file: string, problem: string, options?: { cause?: unknown }) {
    super('EPEERKEY', `peer key ${file}: ${problem}`, options)
    this.name = 'PeerKeyError'
  }
}

/** A listen address, bootstrap entry or CIDR in the peer configuration does not parse. */
export class PeerConfigError extends ShoalError {
  constructor (message: string, options?: { cause?: unknown }) {
    super('EP2PCONFIG', message, options)
    this.name = 'PeerConfigError'
  }
}

/** Publishing a provider record to the DHT failed (no peers yet, or the deadline passed). */
export class AnnounceError extends ShoalError {
  constructor (what: string, reason: string, options?: { cause?: unknown }) {
    super('EANNOUNCE', `could not announce ${what} in the DHT: ${reason}`, options)
    this.name = 'AnnounceError'
  }
}
