/**
 * fio runs against one file, parsed from its JSON output. psync, read-only, one
 * file shared by NUMJOBS jobs, reported as a group.
 */
import { run } from './proc.ts'

export interface FioSpec {
  /** read (sequential) or randread. */
  rw: 'read' | 'randread'
  bs: string
  /** O_DIRECT: every read goes to the filesystem, the page cache is bypassed. */
  direct: boolean
  numjobs: number
  /** Seconds; omitted = read the file (or SIZE of it) once. */
  runtime?: number
  /** Only the first SIZE bytes of the file, e.g. 48m; default the whole file. */
  size?: string
}

export interface FioResult { bytesPerSecond: number, iops: number, ioBytes: number, seconds: number }

export async function fio (file: string, spec: FioSpec): Promise<FioResult> {
  const args = [`--name=${spec.rw}`, `--filename=${file}`, '--readonly', '--ioengine=psync', `--rw=${spec.rw}`, `--bs=${spec.bs}`,
    `--direct=${spec.direct ? 1 : 0}`, `--numjobs=${spec.numjobs}`, '--group_reporting', '--invalidate=1', '--randrepeat=1', '--output-format=json']
  if (spec.runtime !== undefined) args.push('--time_based', `--runtime=${spec.runtime}`)
  if (spec.size !== undefined) args.push(`--size=${spec.size}`)
  const r = await run('fio', args, { timeoutMs: ((spec.runtime ?? 300) + 120) * 1000 })
  // fio may print warnings before the JSON.
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ read: { bw_bytes: number, iops: number, io_bytes: number, runtime: number } }> }
  const read = json.jobs[0]!.read
  return { bytesPerSecond: read.bw_bytes, iops: read.iops, ioBytes: read.io_bytes, seconds: read.runtime / 1000 }
}
