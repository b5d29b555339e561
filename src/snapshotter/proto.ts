/**
 * containerd's Snapshots API as proto-loader loads it from ./proto, and the shapes
 * of its messages as they appear in JavaScript (proto-loader's camelCase names,
 * int64 as numbers: sizes stay far below 2^53). The server (service.ts) and the
 * tests' client load the same definition, so both speak exactly the wire format
 * containerd's proxy plugin does.
 */
import { makeClientConstructor, type ServiceClientConstructor, type ServiceDefinition } from '@grpc/grpc-js'
import { loadSync } from '@grpc/proto-loader'
import { fileURLToPath } from 'node:url'

const PROTO_DIR = fileURLToPath(new URL('./proto/', import.meta.url))
/** The fully qualified service name: containerd calls /containerd.services.snapshots.v1.Snapshots/<Method>. */
export const SNAPSHOTS_SERVICE = 'containerd.services.snapshots.v1.Snapshots'

export interface WireTimestamp { seconds: number, nanos: number }

export interface WireMount { type: string, source: string, target: string, options: string[] }

export interface WireInfo {
  name: string
  parent: string
  kind: number
  createdAt: WireTimestamp | null
  updatedAt: WireTimestamp | null
  labels: Record<string, string>
}

export interface PrepareRequest { snapshotter: string, key: string, parent: string, labels: Record<string, string> }
export interface KeyRequest { snapshotter: string, key: string }
export interface CommitRequest { snapshotter: string, name: string, key: string, labels: Record<string, string> }
export interface UpdateRequest { snapshotter: string, info: WireInfo | null, updateMask: { paths: string[] } | null }
export interface ListRequest { snapshotter: string, filters: string[] }
export interface MountsResponse { mounts: WireMount[] }
export interface InfoResponse { info: WireInfo }
export interface ListResponse { info: WireInfo[] }
export interface UsageResponse { size: number, inodes: number }

let cached: ServiceDefinition | undefined

/** The Snapshots service definition (loaded once; proto-loader parses the .proto files). */
export function snapshotsServiceDefinition (): ServiceDefinition {
  if (cached === undefined) {
    const definition = loadSync('snapshots.proto', {
      includeDirs: [PROTO_DIR],
      // Numbers, not Long objects: sizes and seconds are far below 2^53.
      longs: Number,
      enums: Number,
      // Absent fields come as '' / [] / {} rather than undefined, as in Go.
      defaults: true
    })
    cached = definition[SNAPSHOTS_SERVICE] as ServiceDefinition
  }
  return cached
}

/** A grpc-js client class for the service (tests, and tools that talk to the snapshotter). */
export function snapshotsClientConstructor (): ServiceClientConstructor {
  return makeClientConstructor(snapshotsServiceDefinition(), 'Snapshots')
}

export function toTimestamp (date: Date): WireTimestamp {
  const ms = date.getTime()
  const seconds = Math.floor(ms / 1000)
  return { seconds, nanos: (ms - seconds * 1000) * 1_000_000 }
}

export function fromTimestamp (timestamp: WireTimestamp | null): Date {
  if (timestamp === null) return new Date(0)
  return new Date(timestamp.seconds * 1000 + Math.floor(timestamp.nanos / 1_000_000))
}
