/**
 * The image a real run distributes, and the workload profile the model replays.
 */
import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { convertImage } from '../../src/convert/convert.ts'
import { ensureRealFixtures } from '../../scripts/fixtures/debian-images.ts'
import { Catalog, type ChunkRef } from '../../src/format/catalog.ts'
import type { Digest } from '../../src/oci/digest.ts'
import { generateKeys, loadPrivateKey } from '../../src/format/signing.ts'

export interface PreparedImage {
  /** OCI layout directory the origin serves. */
  layout: string
  tag: string
  /** The public key agents trust. */
  pub: string
  manifestDigest: string
  /** Every pack of the image, so the origin can tell chunk bytes from metadata bytes. */
  packs: Digest[]
  /** The layers' catalogs, bottom layer first (the order a mount fetches them in). */
  catalogs: Digest[]
  /** Sum of the stored (compressed) sizes of the packs: what a full pull would cost. */
  packBytes: number
}

/** The python fixture (built once, cached machine-wide), converted and signed with a key made for this run. */
export async function preparePythonImage (dir: string, log: (line: string) => void): Promise<PreparedImage> {
  const fixtures = await ensureRealFixtures({ log: line => log(`fixtures: ${line}`) })
  const keys = await generateKeys(join(dir, 'keys'))
  const layout = join(dir, 'images')
  const report = await convertImage({ source: fixtures.ref('python'), dest: `oci:${layout}:python`, signingKey: await loadPrivateKey(keys.privatePath) })
  const packs = new Map<Digest, number>()
  for (const layer of report.layers) {
    const catalog = new Catalog(join(layout, 'blobs', 'sha256', layer.catalog.slice(7)))
    try {
      for (const p of catalog.packs()) packs.set(p.digest, p.size)
    } finally {
      catalog.close()
    }
  }
  return {
    layout,
    tag: 'python',
    pub: keys.publicPath,
    manifestDigest: report.manifestDigest,
    packs: [...packs.keys()],
    catalogs: report.layers.map(l => l.catalog),
    packBytes: [...packs.values()].reduce((a, b) => a + b, 0)
  }
}

/** One chunk the workload needed, in the order a lone cold run fetched them. */
export interface ProfileChunk {
  digest: Digest
  pack: Digest
  packOffset: number
  length: number
  storedLength: number
}

/**
 * What the model replays for each node: the chunks a real lone run of the
 * workload fetched, in arrival order, what it fetched to mount the image, and
 * how long that run took cold and warm.
 */
export interface WorkloadProfile {
  /** profileKey(scenario): which scenarios it fits. */
  key: string
  image: string
  workload: unknown
  chunks: ProfileChunk[]
  /** Every pack of the image: the agent announces them all at mount. */
  packs: string[]
  /** The layers' catalogs: fetched at mount through the resolver (peers, then origin), each a chunk of its own. */
  catalogs: Array<{ digest: Digest, size: number }>
  /** The rest of the mount's fetches (index, manifest, config, signature): from the origin, one after another. */
  metadata: { bytes: number, requests: number }
  /** The lone run's times: cold (empty cache), warm (everything cached), and its mount. */
  lone: { coldMs: number, warmMs: number, mountMs: number }
}

/**
 * The chunks an agent fetched, from its state directory: the disk cache holds
 * every chunk it resolved (cache/chunks/<2 hex>/<64 hex>, written as each one
 * arrived, so mtimes give the order), and its verified catalogs say where each
 * lives. This is the real read set, readahead included, not a guess from strace.
 */
export async function fetchedChunks (stateDir: string): Promise<ProfileChunk[]> {
  const cacheDir = join(stateDir, 'cache', 'chunks')
  const files: Array<{ hex: string, mtime: bigint }> = []
  for (const prefix of await readdir(cacheDir)) {
    for (const hex of await readdir(join(cacheDir, prefix))) {
      files.push({ hex, mtime: (await stat(join(cacheDir, prefix, hex), { bigint: true })).mtimeNs })
    }
  }
  files.sort((a, b) => a.mtime < b.mtime ? -1 : a.mtime > b.mtime ? 1 : 0)
  const catalogDir = join(stateDir, 'catalogs')
  const names = (await readdir(catalogDir)).filter(n => n.endsWith('.sqlite'))
  const catalogs = names.map(n => new Catalog(join(catalogDir, n)))
  // The agent fetches whole blobs (catalogs, manifest, signature, config) through its resolver
  // too, so they sit in the chunk cache; in no catalog, they are the mount's metadata here.
  try {
    return files.flatMap(({ hex }) => {
      const ref = catalogs.map(c => c.chunk(`sha256:${hex}`)).find((r): r is ChunkRef => r !== undefined)
      return ref === undefined ? [] : [{ digest: ref.digest, pack: ref.pack, packOffset: ref.packOffset, length: ref.length, storedLength: ref.storedLength }]
    })
  } finally {
    for (const c of catalogs) c.close()
  }
}

/** The sizes of the catalogs an agent fetched (catalogs/<64 hex>.sqlite), in the order of DIGESTS. */
export async function catalogFiles (stateDir: string, digests: Digest[]): Promise<Array<{ digest: Digest, size: number }>> {
  return await Promise.all(digests.map(async digest => ({ digest, size: (await stat(join(stateDir, 'catalogs', `${digest.slice(7)}.sqlite`))).size })))
}
