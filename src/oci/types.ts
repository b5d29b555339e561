import type { Digest } from './digest.ts'

/** OCI content descriptor (image-spec descriptor.md). */
export interface Descriptor {
  mediaType: string
  digest: Digest
  size: number
  artifactType?: string
  annotations?: Record<string, string>
  platform?: { architecture: string, os: string, variant?: string }
}

export interface ImageManifest {
  schemaVersion: 2
  mediaType?: string
  artifactType?: string
  config: Descriptor
  layers: Descriptor[]
  subject?: Descriptor
  annotations?: Record<string, string>
}

export interface ImageIndex {
  schemaVersion: 2
  mediaType?: string
  manifests: Descriptor[]
  annotations?: Record<string, string>
}

/** The part of an OCI image config that a runtime needs (image-spec config.md). */
export interface RuntimeConfig {
  User?: string
  Env?: string[]
  Entrypoint?: string[] | null
  Cmd?: string[] | null
  WorkingDir?: string
  ExposedPorts?: Record<string, object>
  Volumes?: Record<string, object>
  Labels?: Record<string, string>
  StopSignal?: string
}

export interface ImageConfig {
  architecture: string
  os: string
  config?: RuntimeConfig
  rootfs: { type: 'layers', diff_ids: Digest[] }
  history?: unknown[]
  created?: string
}

export const MediaType = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayerTar: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  ociEmpty: 'application/vnd.oci.empty.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  // shoal's own artifact types
  shoalImage: 'application/vnd.shoal.image.v1+json',
  shoalConfig: 'application/vnd.shoal.config.v1+json',
  shoalCatalog: 'application/vnd.shoal.catalog.v1.sqlite',
  shoalPack: 'application/vnd.shoal.pack.v1',
  shoalSignature: 'application/vnd.shoal.signature.v1+json',
  dsseEnvelope: 'application/vnd.dsse.envelope.v1+json'
} as const

export const Annotation = {
  refName: 'org.opencontainers.image.ref.name'
} as const
