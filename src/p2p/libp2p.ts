/**
 * The libp2p family's run-time values (the list is ./libp2p-packages.ts), loaded from
 * one esbuild bundle of them when it is there and fresh, else from the packages.
 * Resolving and linking libp2p's ~1,000 modules is most of what an agent with peers
 * spends to start; the bundle is one module (docs/BENCHMARKS.md, "Agent start").
 *
 * The bundle (`npm run build:libp2p`, which scripts/setup.sh runs) is used only when it
 * is newer than both ./libp2p-packages.ts and package-lock.json: after an export is
 * added to the list, or a dependency changed, the packages are loaded until it is
 * rebuilt. `npm ci` deletes it with node_modules. SHOAL_LIBP2P_BUNDLE=off loads the
 * packages whatever the bundle's state (to compare, or to rule the bundle out).
 */
import { statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import type { CID as CIDType } from 'multiformats/cid'
import type { Uint8ArrayList as Uint8ArrayListType } from 'uint8arraylist'

export type Libp2pModules = typeof import('./libp2p-packages.ts')

const root = resolve(import.meta.dirname, '..', '..')
/** Where scripts/bundle-libp2p.ts writes the bundle (.mjs: no package.json in node_modules/ says "type": "module"). */
export const LIBP2P_BUNDLE = join(root, 'node_modules', '.cache', 'shoal', 'libp2p.mjs')
/** The files the bundle must be newer than. */
export const LIBP2P_BUNDLE_SOURCES = [join(import.meta.dirname, 'libp2p-packages.ts'), join(root, 'package-lock.json')]

/** Whether `bundle` exists and is newer than every file in `sources` (a missing source: no). */
export function bundleIsFresh (bundle: string, sources: string[]): boolean {
  const built = statSync(bundle, { throwIfNoEntry: false })?.mtimeMs
  return built !== undefined && sources.every(s => built > (statSync(s, { throwIfNoEntry: false })?.mtimeMs ?? Infinity))
}

/** The bundle at `bundle` if it is fresh, else the packages. */
export async function loadLibp2p (bundle: string, sources: string[]): Promise<Libp2pModules> {
  return bundleIsFresh(bundle, sources) ? await import(pathToFileURL(bundle).href) as Libp2pModules : await import('./libp2p-packages.ts')
}

const modules = process.env.SHOAL_LIBP2P_BUNDLE === 'off' ? await import('./libp2p-packages.ts') : await loadLibp2p(LIBP2P_BUNDLE, LIBP2P_BUNDLE_SOURCES)

export const {
  noise, yamux, generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf, identify, kadDHT, passthroughMapper,
  peerIdFromString, ping, generateKey, preSharedKey, tcp, LengthPrefixedDecoder, messageStreamToDuplex, multiaddr,
  pipe, createLibp2p, CID, createMultihash, Uint8ArrayList
} = modules
// The classes are types too: the same names as types, so that importers need one import.
export type CID = CIDType
export type Uint8ArrayList = Uint8ArrayListType
