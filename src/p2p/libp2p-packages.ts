/**
 * Every run-time value src/ takes from the libp2p family of packages, and the entry
 * point of the bundle that scripts/bundle-libp2p.ts builds from them. Node's loader
 * spends most of an agent's start resolving and linking libp2p's ~1,000 modules; one
 * bundled file of the same exports loads in a fraction of that. src/ imports these
 * values from ./libp2p.ts, which picks the bundle or this file (types come straight
 * from the packages, with `import type`). test/p2p/libp2p-bundle.test.ts checks that
 * no other file in src/ imports a value from these packages.
 */
export { noise } from '@chainsafe/libp2p-noise'
export { yamux } from '@chainsafe/libp2p-yamux'
export { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
export { identify } from '@libp2p/identify'
export { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
export { peerIdFromString } from '@libp2p/peer-id'
export { ping } from '@libp2p/ping'
export { generateKey, preSharedKey } from '@libp2p/pnet'
export { tcp } from '@libp2p/tcp'
export { LengthPrefixedDecoder, messageStreamToDuplex } from '@libp2p/utils'
export { multiaddr } from '@multiformats/multiaddr'
export { pipe } from 'it-pipe'
export { createLibp2p } from 'libp2p'
export { CID } from 'multiformats/cid'
export { create as createMultihash } from 'multiformats/hashes/digest'
export { Uint8ArrayList } from 'uint8arraylist'
