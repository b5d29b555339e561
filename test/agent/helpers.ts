import { generateKeyPairSync } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { convertImage } from '../../src/convert/convert.ts'
import { buildSyntheticImage } from '../helpers/synthetic.ts'

/** Image `t` (one file, `hello`: "world\n") converted into DIR/images, signed by a new key whose public half is DIR/shoal.pub. */
export async function helloImage (dir: string): Promise<{ images: string, pub: string }> {
  const keys = generateKeyPairSync('ed25519')
  const src = await buildSyntheticImage(join(dir, 'src'), 't', [[{ type: 'file', path: 'hello', content: 'world\n' }]])
  const images = join(dir, 'images')
  await convertImage({ source: src.ref, dest: `oci:${images}:t`, signingKey: keys.privateKey })
  const pub = join(dir, 'shoal.pub')
  await writeFile(pub, keys.publicKey.export({ type: 'spki', format: 'pem' }))
  return { images, pub }
}
