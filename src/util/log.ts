/**
 * The slice of pino's API the read path logs through: a pino Logger fits as is,
 * and tests can pass `silentLogger` or collect entries.
 */
export interface Logger {
  debug (fields: object, message: string): void
  info (fields: object, message: string): void
  warn (fields: object, message: string): void
  error (fields: object, message: string): void
}

const ignore = (): void => {}
export const silentLogger: Logger = { debug: ignore, info: ignore, warn: ignore, error: ignore }

export function errorText (err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}
