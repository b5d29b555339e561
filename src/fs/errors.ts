import { ShoalError } from '../errors.ts'

/** A FUSE mount could not be made or removed; the message says what to check. */
export class MountError extends ShoalError {
  constructor (message: string, options?: { cause?: unknown }) {
    super('EMOUNT', message, options)
    this.name = 'MountError'
  }
}
