import { UsageError } from '../errors.ts'

/** Commander's accumulator for repeatable flags. */
export const collect = (value: string, previous: string[] = []): string[] => [...previous, value]

export function parseSize (text: string, flag: string): number {
  const m = /^(\d+)([KMG]i?B?)?$/i.exec(text.trim())
  if (m === null) throw new UsageError(`${flag} ${text}: write a size such as 1048576, 1MiB or 16M`)
  const unit = (m[2] ?? '').toUpperCase()[0]
  return Number(m[1]) * (unit === 'K' ? 1024 : unit === 'M' ? 1048576 : unit === 'G' ? 1073741824 : 1)
}
