/**
 * A pause image for the CRI plugin's pod sandboxes, made here: one gzip layer
 * holding a 129-byte static x86-64 ELF, /pause, that calls pause(2) forever (the
 * job of registry.k8s.io/pause, which a test cannot download). It shares no layer
 * with any real image, so pulling it does not warm the cache for the image under
 * test. StopPodSandbox kills the sandbox with SIGKILL, so it needs no signal handling.
 */
import { createHash } from 'node:crypto'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { skopeoCopy } from '../../registry/helpers.ts'

/** The ELF: header, one PT_LOAD program header, then `mov eax, 34 (pause); syscall; jmp back`. */
export function pauseBinary (): Buffer {
  if (process.arch !== 'x64') throw new Error(`the sandbox image's pause binary is x86-64 code; this machine is ${process.arch}`)
  const base = 0x400000n
  const code = Buffer.from([0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7])
  const elf = Buffer.alloc(64 + 56 + code.length)
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]).copy(elf, 0) // ELF, 64-bit, little endian, version 1, System V
  elf.writeUInt16LE(2, 16) // ET_EXEC
  elf.writeUInt16LE(0x3e, 18) // x86-64
  elf.writeUInt32LE(1, 20)
  elf.writeBigUInt64LE(base + 120n, 24) // entry: the code
  elf.writeBigUInt64LE(64n, 32) // program headers right after this header
  elf.writeUInt16LE(64, 52) // header size
  elf.writeUInt16LE(56, 54) // program header size
  elf.writeUInt16LE(1, 56) // one program header
  elf.writeUInt32LE(1, 64) // PT_LOAD
  elf.writeUInt32LE(5, 68) // R + X
  elf.writeBigUInt64LE(0n, 72) // from file offset 0
  elf.writeBigUInt64LE(base, 80)
  elf.writeBigUInt64LE(base, 88)
  elf.writeBigUInt64LE(BigInt(elf.length), 96)
  elf.writeBigUInt64LE(BigInt(elf.length), 104)
  elf.writeBigUInt64LE(0x1000n, 112)
  code.copy(elf, 120)
  return elf
}

/** A ustar archive of FILES (regular files, root-owned). */
function tarOf (files: Array<{ name: string, mode: number, data: Buffer }>): Buffer {
  const blocks: Buffer[] = []
  for (const file of files) {
    const header = Buffer.alloc(512)
    header.write(file.name, 0, 100, 'utf8')
    header.write(`${file.mode.toString(8).padStart(7, '0')}\0`, 100)
    header.write('0000000\0', 108) // uid
    header.write('0000000\0', 116) // gid
    header.write(`${file.data.length.toString(8).padStart(11, '0')}\0`, 124)
    header.write(`${Math.floor(Date.UTC(2024, 0, 1) / 1000).toString(8).padStart(11, '0')}\0`, 136)
    header.write('        ', 148) // checksum field counts as spaces
    header.write('0', 156) // regular file
    header.write('ustar\0' + '00', 257, 'binary')
    let sum = 0
    for (const byte of header) sum += byte
    header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148)
    blocks.push(header, file.data, Buffer.alloc((512 - file.data.length % 512) % 512))
  }
  blocks.push(Buffer.alloc(1024))
  return Buffer.concat(blocks)
}

export interface SandboxImageLayout {
  /** An OCI image layout holding the image under TAG. */
  layoutDir: string
  tag: string
  /** `oci:<layoutDir>:<tag>` for skopeo. */
  ref: string
}

/** Writes the pause image as an OCI image layout into the new directory DIR. */
export async function writeSandboxImage (dir: string, tag = 'pause'): Promise<SandboxImageLayout> {
  const blobs = join(dir, 'blobs', 'sha256')
  await mkdir(blobs, { recursive: true })
  const put = async (data: Buffer, mediaType: string): Promise<{ mediaType: string, digest: string, size: number }> => {
    const hex = createHash('sha256').update(data).digest('hex')
    await writeFile(join(blobs, hex), data)
    return { mediaType, digest: `sha256:${hex}`, size: data.length }
  }
  const tar = tarOf([{ name: 'pause', mode: 0o755, data: pauseBinary() }])
  const layer = await put(gzipSync(tar, { level: 9 }), 'application/vnd.oci.image.layer.v1.tar+gzip')
  const config = await put(Buffer.from(JSON.stringify({
    created: '2024-01-01T00:00:00Z',
    architecture: 'amd64',
    os: 'linux',
    config: { Entrypoint: ['/pause'], WorkingDir: '/' },
    rootfs: { type: 'layers', diff_ids: [`sha256:${createHash('sha256').update(tar).digest('hex')}`] },
    history: [{ created: '2024-01-01T00:00:00Z', created_by: 'shoal test pause binary (pause(2) forever)' }]
  })), 'application/vnd.oci.image.config.v1+json')
  const manifest = await put(Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config, layers: [layer] })),
    'application/vnd.oci.image.manifest.v1+json')
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
  await writeFile(join(dir, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    manifests: [{ ...manifest, annotations: { 'org.opencontainers.image.ref.name': tag } }]
  }))
  return { layoutDir: dir, tag, ref: `oci:${dir}:${tag}` }
}

/**
 * Writes the pause image into DIR and pushes it (skopeo) to the plain-HTTP test
 * registry REGISTRYHOST (127.0.0.1:PORT); returns the reference for
 * startContainerd's sandboxImage, e.g. 127.0.0.1:PORT/shoal/pause:1.
 */
export async function pushSandboxImage (registryHost: string, dir: string, repository = 'shoal/pause:1'): Promise<string> {
  const layout = await writeSandboxImage(dir)
  const reference = `${registryHost}/${repository}`
  await skopeoCopy(layout.ref, `docker://${reference}`)
  return reference
}
