/**
 * The standard synthetic image: three layers that together exercise what a layer
 * converter and a merged (overlay) view must get right, and the merged view they
 * must produce (`expectedMergedPaths`, checked against `umoci unpack` in
 * test/fixtures/synthetic.test.ts).
 *
 * Layer 1 lays down a tree; layers 2 and 3 change it. In the merged view:
 * - File whiteout: L1 /etc/remove-me, L2 etc/.wh.remove-me → absent.
 * - Directory whiteout, then recreated: L1 /var/cache/old/stale.txt, L2 var/cache/.wh.old,
 *   L3 var/cache/old/fresh.txt → /var/cache/old holds only fresh.txt.
 * - Opaque directory: L1 /opt/app/old-{1,2}.txt, L2 opt/app/.wh..wh..opq + new.txt,
 *   L3 shared-copy.bin → /opt/app holds new.txt and shared-copy.bin only.
 * - File replaced: /etc/os-release (content, and mode 0644 → 0600), /usr/bin/tool → upper version.
 * - Directory replaced by a file: L1 /opt/was-dir/child.txt, L2 file opt/was-dir (no
 *   whiteout) → a file; child.txt is gone with the directory.
 * - File replaced by a directory: L1 file /opt/was-file, L2 directory + inner.txt → a directory.
 * - Directory attributes replaced: /home/user 0750 in L1, 0700 in L2 → 0700, and L1's
 *   .profile inside it is still there (a directory entry alone is not opaque).
 * - Hard link group of 3 whose target is hidden: L1 /data/hl-1 with links hl-2 and hl-3,
 *   L3 whiteout of hl-1 → hl-2 and hl-3 remain, one inode (nlink 2), same bytes.
 * - Hard link to a setuid file: /usr/bin/setuid-alias → setuid-tool, one inode, 04755.
 * - Symlinks, kept verbatim and never resolved: relative, absolute, dangling, escaping
 *   with ../../.., and a 255-character target.
 * - xattrs, byte-exact: user.* text and binary (NUL, 0xff, '=', newline);
 *   security.capability v2 with a 0x80 byte.
 * - Special files: char 1:3, block 7:0 (group 6), fifo.
 * - Modes and owners: setuid 04755, setgid 02755 (group 50), sticky /tmp 01777, 1000:1000.
 * - Sizes: empty, exactly 1 MiB, 3.5 MiB + 3 bytes (not a multiple of 1 MiB, 4 KiB or 512).
 * - Duplicates: the same text twice in L1 and again in L2; a 64 KiB + 5 blob in L1
 *   and L3 → distinct files with equal content digests.
 * - Names: a 250-character name (260-character path), a 24-level path over 255
 *   characters, a space, UTF-8.
 *
 * Every entry has mtime SYNTHETIC_MTIME. All parent directories are explicit tar
 * entries, so no attribute of the merged view is left to an unpacker's defaults.
 */
import { posix } from 'node:path'
import { sha256 } from '../../src/oci/digest.ts'
import type { FsNode } from './rootfs.ts'
import { contentBytes, type GeneratedContent, type SyntheticEntry } from './synthetic.ts'

/** What one path of the merged view must look like (see FsNode). */
export type ExpectedNode = FsNode

const MiB = 1024 * 1024

/** `security.capability` v2 (20 bytes): effective, permitted = CAP_SETUID | CAP_NET_RAW. */
export const CAPABILITY_XATTR = Buffer.from([
  0x01, 0x00, 0x00, 0x02, // magic_etc: VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
  0x80, 0x20, 0x00, 0x00, // permitted[0]: bits 7 and 13
  0x00, 0x00, 0x00, 0x00, // inheritable[0]
  0x00, 0x00, 0x00, 0x00, // permitted[1]
  0x00, 0x00, 0x00, 0x00 //  inheritable[1]
])
/** A user xattr value with NUL, high bytes, '=' and a newline: must survive byte-exact. */
const BINARY_XATTR = Buffer.from([0x00, 0xff, 0x80, 0x0a, 0x3d, 0x41])

const SAME_TEXT = 'the same bytes in three files\n'
const SHARED: GeneratedContent = { size: 64 * 1024 + 5, seed: 'shared' }
const BIG: GeneratedContent = { size: 3.5 * MiB + 3, seed: 'big' }
const EXACT: GeneratedContent = { size: MiB, seed: 'exact-1mib' }
const LONG_NAME = `${'n'.repeat(246)}.txt`
const DEEP_DIRS = Array.from({ length: 24 }, (_, i) => `level-${String(i).padStart(2, '0')}`)
const DEEP_LEAF = `deep/${DEEP_DIRS.join('/')}/leaf-at-the-bottom-of-a-long-path.txt`

const TEXT = {
  osReleaseV1: 'ID=shoal\nVERSION_ID=1\n',
  osReleaseV2: 'ID=shoal\nVERSION_ID=2\n',
  toolV1: '#!/bin/sh\necho tool v1\n',
  toolV2: '#!/bin/sh\necho tool v2\n',
  hardLinked: 'one inode, three names\n'
}

export function standardSyntheticLayers (): SyntheticEntry[][] {
  const dir = (path: string, mode = 0o755, owner: { uid?: number, gid?: number } = {}): SyntheticEntry => ({ type: 'dir', path, mode, ...owner })
  const file = (path: string, content: string | GeneratedContent, mode = 0o644): SyntheticEntry => ({ type: 'file', path, content, mode })

  const layer1: SyntheticEntry[] = [
    dir('etc'),
    file('etc/hostname', 'shoal-synthetic\n'),
    file('etc/os-release', TEXT.osReleaseV1),
    file('etc/remove-me', 'whited out in layer 2\n'),
    dir('usr'), dir('usr/bin'), dir('usr/lib'),
    file('usr/bin/tool', TEXT.toolV1, 0o755),
    { type: 'symlink', path: 'usr/bin/tool-rel', target: 'tool' },
    { type: 'symlink', path: 'usr/bin/tool-abs', target: '/usr/bin/tool' },
    file('usr/bin/setuid-tool', 'runs as its owner\n', 0o4755),
    { type: 'hardlink', path: 'usr/bin/setuid-alias', target: 'usr/bin/setuid-tool', mode: 0o4755 },
    { type: 'file', path: 'usr/bin/cap-tool', content: 'needs capabilities\n', mode: 0o755, xattrs: { 'security.capability': CAPABILITY_XATTR } },
    file('usr/lib/big.bin', BIG),
    { type: 'symlink', path: 'usr/lib/big.bin.1', target: 'big.bin' },
    file('usr/lib/exact-1mib.bin', EXACT),
    dir('dev'),
    { type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 },
    { type: 'block', path: 'dev/loop0', major: 7, minor: 0, mode: 0o660, gid: 6 },
    { type: 'fifo', path: 'dev/initctl', mode: 0o600 },
    dir('tmp', 0o1777),
    dir('home'),
    dir('home/user', 0o750, { uid: 1000, gid: 1000 }),
    { type: 'file', path: 'home/user/.profile', content: "export PS1='$ '\n", uid: 1000, gid: 1000 },
    dir('var'), dir('var/cache'), dir('var/cache/old'),
    file('var/cache/old/stale.txt', 'hidden by the whiteout of its directory\n'),
    dir('data'),
    file('data/empty', ''),
    dir('data/empty-dir'),
    file('data/same-a.txt', SAME_TEXT),
    file('data/same-b.txt', SAME_TEXT),
    file('data/shared.bin', SHARED),
    { type: 'file', path: 'data/hl-1', content: TEXT.hardLinked, mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'hardlink', path: 'data/hl-2', target: 'data/hl-1', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'hardlink', path: 'data/hl-3', target: 'data/hl-1', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'symlink', path: 'data/dangling', target: 'does-not-exist' },
    { type: 'symlink', path: 'data/escape', target: '../../../etc/shadow' },
    { type: 'file', path: 'data/xattrs', content: 'has extended attributes\n', xattrs: { 'user.comment': 'hello', 'user.binary': BINARY_XATTR } },
    file('data/with space.txt', 'a space in the name\n'),
    file('data/ünïcødé-名前.txt', 'a UTF-8 name\n'),
    dir('data/long'),
    file(`data/long/${LONG_NAME}`, 'a 250-character name\n'),
    { type: 'symlink', path: 'data/long-link', target: `long/${LONG_NAME}` },
    ...['deep', ...DEEP_DIRS.map((_, i) => `deep/${DEEP_DIRS.slice(0, i + 1).join('/')}`)].map(path => dir(path)),
    file(DEEP_LEAF, 'deep down\n'),
    dir('opt'), dir('opt/app'),
    file('opt/app/old-1.txt', 'hidden by the opaque dir\n'),
    file('opt/app/old-2.txt', 'hidden as well\n'),
    dir('opt/was-dir'),
    file('opt/was-dir/child.txt', 'gone with its directory\n'),
    file('opt/was-file', 'becomes a directory\n')
  ]

  // Whiteouts come before their siblings, as image-spec asks of layer producers.
  const layer2: SyntheticEntry[] = [
    { type: 'whiteout', path: 'etc/remove-me' },
    { type: 'file', path: 'etc/os-release', content: TEXT.osReleaseV2, mode: 0o600 },
    file('usr/bin/tool', TEXT.toolV2, 0o755),
    { type: 'file', path: 'usr/bin/setgid-tool', content: 'runs with its group\n', mode: 0o2755, gid: 50 },
    { type: 'whiteout', path: 'var/cache/old' },
    dir('home/user', 0o700, { uid: 1000, gid: 1000 }),
    dir('opt/app'),
    { type: 'opaque', path: 'opt/app' },
    file('opt/app/new.txt', 'added in layer 2\n'),
    file('opt/was-dir', 'a file where a directory was\n'),
    dir('opt/was-file'),
    file('opt/was-file/inner.txt', 'a directory where a file was\n'),
    file('data/same-c.txt', SAME_TEXT)
  ]

  const layer3: SyntheticEntry[] = [
    { type: 'whiteout', path: 'data/hl-1' },
    dir('var/cache/old'),
    file('var/cache/old/fresh.txt', 'recreated after the whiteout\n'),
    file('opt/app/shared-copy.bin', SHARED),
    dir('srv'),
    file('srv/index.html', '<h1>shoal</h1>\n')
  ]

  return [layer1, layer2, layer3]
}

/**
 * The merged view of standardSyntheticLayers(), keyed by absolute path (the root
 * itself is not listed). A path not in this map must not exist.
 */
export const expectedMergedPaths: ReadonlyMap<string, ExpectedNode> = buildExpectation()

function buildExpectation (): Map<string, ExpectedNode> {
  const view = new Map<string, ExpectedNode>()
  const dir = (path: string, mode = 0o755, uid = 0, gid = 0): void => { view.set(path, { type: 'dir', mode, uid, gid }) }
  const file = (path: string, content: string | GeneratedContent, extra: Partial<ExpectedNode> = {}): void => {
    const bytes = contentBytes(content)
    view.set(path, { type: 'file', mode: 0o644, uid: 0, gid: 0, size: bytes.length, sha256: sha256(bytes), ...extra })
  }
  const symlink = (path: string, target: string): void => { view.set(path, { type: 'symlink', mode: 0o777, uid: 0, gid: 0, target }) }

  dir('/etc')
  file('/etc/hostname', 'shoal-synthetic\n')
  file('/etc/os-release', TEXT.osReleaseV2, { mode: 0o600 })

  dir('/usr'); dir('/usr/bin'); dir('/usr/lib')
  file('/usr/bin/tool', TEXT.toolV2, { mode: 0o755 })
  symlink('/usr/bin/tool-rel', 'tool')
  symlink('/usr/bin/tool-abs', '/usr/bin/tool')
  file('/usr/bin/setuid-tool', 'runs as its owner\n', { mode: 0o4755, hardlinkGroup: 'setuid' })
  file('/usr/bin/setuid-alias', 'runs as its owner\n', { mode: 0o4755, hardlinkGroup: 'setuid' })
  file('/usr/bin/setgid-tool', 'runs with its group\n', { mode: 0o2755, gid: 50 })
  file('/usr/bin/cap-tool', 'needs capabilities\n', { mode: 0o755, xattrs: { 'security.capability': CAPABILITY_XATTR } })
  file('/usr/lib/big.bin', BIG)
  symlink('/usr/lib/big.bin.1', 'big.bin')
  file('/usr/lib/exact-1mib.bin', EXACT)

  dir('/dev')
  view.set('/dev/null', { type: 'char', mode: 0o666, uid: 0, gid: 0, major: 1, minor: 3 })
  view.set('/dev/loop0', { type: 'block', mode: 0o660, uid: 0, gid: 6, major: 7, minor: 0 })
  view.set('/dev/initctl', { type: 'fifo', mode: 0o600, uid: 0, gid: 0 })

  dir('/tmp', 0o1777)
  dir('/home')
  dir('/home/user', 0o700, 1000, 1000)
  file('/home/user/.profile', "export PS1='$ '\n", { uid: 1000, gid: 1000 })

  dir('/var'); dir('/var/cache'); dir('/var/cache/old')
  file('/var/cache/old/fresh.txt', 'recreated after the whiteout\n')

  dir('/data')
  file('/data/empty', '')
  dir('/data/empty-dir')
  file('/data/same-a.txt', SAME_TEXT)
  file('/data/same-b.txt', SAME_TEXT)
  file('/data/same-c.txt', SAME_TEXT)
  file('/data/shared.bin', SHARED)
  file('/data/hl-2', TEXT.hardLinked, { mode: 0o640, uid: 1000, gid: 1000, hardlinkGroup: 'hl' })
  file('/data/hl-3', TEXT.hardLinked, { mode: 0o640, uid: 1000, gid: 1000, hardlinkGroup: 'hl' })
  symlink('/data/dangling', 'does-not-exist')
  symlink('/data/escape', '../../../etc/shadow')
  file('/data/xattrs', 'has extended attributes\n', { xattrs: { 'user.comment': Buffer.from('hello'), 'user.binary': BINARY_XATTR } })
  file('/data/with space.txt', 'a space in the name\n')
  file('/data/ünïcødé-名前.txt', 'a UTF-8 name\n')
  dir('/data/long')
  file(`/data/long/${LONG_NAME}`, 'a 250-character name\n')
  symlink('/data/long-link', `long/${LONG_NAME}`)
  dir('/deep')
  DEEP_DIRS.forEach((_, i) => { dir(`/deep/${DEEP_DIRS.slice(0, i + 1).join('/')}`) })
  file(`/${DEEP_LEAF}`, 'deep down\n')

  dir('/opt')
  dir('/opt/app')
  file('/opt/app/new.txt', 'added in layer 2\n')
  file('/opt/app/shared-copy.bin', SHARED)
  file('/opt/was-dir', 'a file where a directory was\n')
  dir('/opt/was-file')
  file('/opt/was-file/inner.txt', 'a directory where a file was\n')

  dir('/srv')
  file('/srv/index.html', '<h1>shoal</h1>\n')

  // Every listed path's parent is listed too (or is the root): catches typos above.
  for (const path of view.keys()) {
    const parent = posix.dirname(path)
    if (parent !== '/' && view.get(parent)?.type !== 'dir') throw new Error(`expectedMergedPaths: ${path} has no parent directory entry`)
  }
  return view
}
