/**
 * Typed errors. Every error a user can meet says what went wrong and what to do;
 * `code` is stable for scripts and tests, the message is for people.
 */
export class ShoalError extends Error {
  readonly code: string
  constructor (code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'ShoalError'
    this.code = code
  }
}

/** Bad command-line input or configuration: the user must change what they typed. */
export class UsageError extends ShoalError {
  constructor (message: string) { super('EUSAGE', message) }
}

/** A digest, length or signature did not match: the data must not be trusted. */
export class IntegrityError extends ShoalError {
  /** The object that failed, e.g. `pack sha256:...` or `chunk sha256:... of /usr/bin/python3`. */
  readonly object: string
  constructor (object: string, message: string) {
    super('EINTEGRITY', `${object}: ${message}`)
    this.object = object
  }
}

/** The signature is missing, wrong, or made by a key that is not trusted. */
export class SignatureError extends ShoalError {
  constructor (message: string) { super('ESIGNATURE', message) }
}

/** A source image or archive is malformed (truncated tar, bad manifest, unknown media type). */
export class FormatError extends ShoalError {
  constructor (message: string, options?: { cause?: unknown }) { super('EFORMAT', message, options) }
}

/** Something asked for does not exist (tag, blob, file). */
export class NotFoundError extends ShoalError {
  constructor (message: string) { super('ENOTFOUND', message) }
}

/** An origin (HTTP server, registry, directory) failed or answered wrongly. */
export class OriginError extends ShoalError {
  /** HTTP status when there was one; retryable errors are 5xx and connection failures. */
  readonly status?: number
  readonly retryable: boolean
  constructor (message: string, options: { status?: number, retryable: boolean, cause?: unknown }) {
    super('EORIGIN', message, { cause: options.cause })
    this.status = options.status
    this.retryable = options.retryable
  }
}
