import { ShoalError } from '../errors.ts'
import type { Digest } from '../oci/digest.ts'

/** What one source said when asked for a chunk, for the error message and logs. */
export interface SourceFailure {
  source: string
  reason: string
}

/**
 * No source produced verified bytes for a chunk in time. The FUSE layer turns
 * this into EIO: the caller sees a failed read, never wrong bytes or a hang.
 */
export class ChunkUnavailableError extends ShoalError {
  readonly digest: Digest
  readonly failures: readonly SourceFailure[]
  constructor (digest: Digest, summary: string, failures: readonly SourceFailure[]) {
    const detail = failures.length === 0 ? '' : `: ${failures.map(f => `${f.source}: ${f.reason}`).join('; ')}`
    super('ECHUNKUNAVAILABLE', `chunk ${digest} ${summary}${detail}`)
    this.name = 'ChunkUnavailableError'
    this.digest = digest
    this.failures = failures
  }
}
