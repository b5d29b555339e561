import type { Digest } from './digest.ts'

/**
 * How a node finds the shoal conversion of an ordinary image in the image's own
 * repository (ImageApparate's name mapping): by the source manifest's digest, which
 * a pod's image resolves to whatever its tag says now, so a moved tag never maps a
 * pod to another image's conversion; `TAG-shoal` is the twin that people read.
 */
export const conversionTag = (sourceManifest: Digest): string => `sha256-${sourceManifest.slice(7)}.shoal`

/** The human-facing twin of TAG (a tag is at most 128 characters, so a long one is cut to fit). */
export const twinTag = (tag: string): string => `${tag.slice(0, 128 - '-shoal'.length)}-shoal`
