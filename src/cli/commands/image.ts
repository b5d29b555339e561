import type { Command } from 'commander'
import { DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE } from '../../convert/defaults.ts'
import { DEFAULT_SIGNATURE_LIFETIME } from '../../format/signing-defaults.ts'
import { collect } from '../args.ts'

// The definitions only: each action is in image-actions.ts, imported when it runs, so
// that `shoal --help` does not load the converter, SQLite or the registry client.

/** keygen, convert, verify, inspect: the commands that make and check images. */
export function registerImageCommands (program: Command): void {
  program.command('keygen')
    .description('create an ed25519 signing key pair: DIR/shoal.key (secret) and DIR/shoal.pub (give to agents)')
    .requiredOption('--out <dir>', 'directory for shoal.key and shoal.pub')
    .action(async (opts: { out: string }) => { await (await import('./image-actions.ts')).keygen(opts) })

  registryOptions(program.command('convert')
    .description('convert an OCI image into a signed shoal image (lazy-loadable, chunked, deduplicated)')
    .argument('<source>', 'oci:DIR:TAG, oci-archive:FILE[:TAG] or docker://HOST/REPO[:TAG|@DIGEST]')
    .argument('<dest>', 'oci:DIR:TAG (created if missing; chunks already there are reused) or docker://HOST/REPO:TAG (pushed, tag last)')
    .requiredOption('--key <file>', 'ed25519 private key from shoal keygen')
    .option('--chunk-size <bytes>', 'fixed chunk size', String(DEFAULT_CHUNK_SIZE))
    .option('--compression <codec>', 'chunk compression: zstd or none', 'zstd')
    .option('--pack-size <bytes>', 'target size of pack blobs', String(DEFAULT_PACK_SIZE))
    .option('--platform <os/arch[/variant]>', 'image to take from a multi-platform source (default: this host\'s)')
    .option('--src-creds <user:password>', 'credentials for a docker:// source (default: the docker/podman login files)'))
    .option('--name <repo:tag>', 'name to sign the image for, REPO:TAG without the registry host (repeatable; default: the destination\'s REPO:TAG, or its TAG for oci:, and a docker:// source\'s REPO:TAG)', collect)
    .option('--signed-version <n>', 'signed version, an integer agents never let go down per name (default: the time in seconds)')
    .option('--expires <duration>', `signature lifetime: 90d, 12h, 2w, ... or never (default ${DEFAULT_SIGNATURE_LIFETIME}); renew with shoal sign`)
    .option('--json', 'print the report as JSON')
    .action(async (source: string, dest: string, opts: ConvertFlags) => { await (await import('./image-actions.ts')).convert(source, dest, opts) })

  registryOptions(program.command('push')
    .description('publish a signed shoal image from a layout to a registry: blobs, signature, then the tag')
    .argument('<image>', 'oci:DIR:TAG')
    .argument('<dest>', 'docker://HOST/REPO:TAG'))
    .option('--json', 'print the report as JSON')
    .action(async (image: string, dest: string, opts: RegistryFlags & { json?: boolean }) => { await (await import('./image-actions.ts')).push(image, dest, opts) })

  readOptions(program.command('sign'))
    .description('(re-)sign a shoal image in place, without converting it again: renew its expiry, raise its version, change its names, or move a v1 signature to v2')
    .argument('<image>', 'oci:DIR:TAG or docker://HOST/REPO:TAG')
    .requiredOption('--key <file>', 'ed25519 private key from shoal keygen')
    .option('--name <repo:tag>', 'name to sign the image for (repeatable; default: the names of its current signature by this key, else its own REPO:TAG or TAG and its source\'s)', collect)
    .option('--signed-version <n>', 'signed version (default: the time in seconds, and above the current signature\'s)')
    .option('--expires <duration>', `signature lifetime: 90d, 12h, 2w, ... or never (default ${DEFAULT_SIGNATURE_LIFETIME})`)
    .option('--json', 'print the result as JSON')
    .action(async (image: string, opts: ReadFlags & SignFlags & { key: string, json?: boolean }) => { await (await import('./image-actions.ts')).sign(image, opts) })

  readOptions(program.command('verify'))
    .description('check the signature and every digest of a shoal image, down to every chunk')
    .argument('<image>', 'oci:DIR:TAG or docker://HOST/REPO:TAG')
    .requiredOption('--trust <pubkey>', 'trusted public key, shoal.pub (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--name <repo:tag>', 'also require the signature to name this REPO:TAG (or TAG), as an agent mounting it under that name does')
    .action(async (image: string, opts: { trust: string[], name?: string } & ReadFlags) => { await (await import('./image-actions.ts')).verify(image, opts) })

  readOptions(program.command('inspect'))
    .description('show layers, files, chunks, sizes and deduplication of a shoal image')
    .argument('<image>', 'oci:DIR:TAG or docker://HOST/REPO:TAG')
    .option('--trust <pubkey>', 'check the signature against this key (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--json', 'print as JSON')
    .action(async (image: string, opts: { trust?: string[], json?: boolean } & ReadFlags) => { await (await import('./image-actions.ts')).inspect(image, opts) })
}

export interface SignFlags { name?: string[], signedVersion?: string, expires?: string }

export interface RegistryFlags { destCreds?: string, ca?: string, plainHttp?: boolean, mountFrom: string[] }

export interface ReadFlags { creds?: string, ca?: string, plainHttp?: boolean }

export type ConvertFlags = RegistryFlags & SignFlags & { key: string, chunkSize: string, compression: string, packSize: string, platform?: string, srcCreds?: string, json?: boolean }

/** The flags for reaching registries that convert and push share. */
function registryOptions (cmd: Command): Command {
  return cmd
    .option('--dest-creds <user:password>', 'credentials for a docker:// destination (default: the docker/podman login files)')
    .option('--ca <file>', 'PEM CA certificate(s) to trust for registries, besides the system ones')
    .option('--plain-http', 'reach registries over plain HTTP instead of HTTPS')
    .option('--mount-from <repo>', 'another repository on the destination registry to mount blobs from instead of uploading them (repeatable)', (v: string, prev: string[]) => [...prev, v], [])
}

/** The flags verify and inspect take to read an image from a registry. */
function readOptions (cmd: Command): Command {
  return cmd
    .option('--creds <user:password>', 'credentials for a docker:// image (default: the docker/podman login files)')
    .option('--ca <file>', 'PEM CA certificate(s) to trust for the registry, besides the system ones')
    .option('--plain-http', 'reach the registry over plain HTTP instead of HTTPS')
}
