/**
 * Runs async critical sections one at a time per key, in call order. The
 * snapshotter takes it per target layer so that two Prepares of the same layer
 * (two pods pulling one image) never mount it twice: the second one waits and
 * then finds the first one's committed snapshot.
 */
export class KeyedLock {
  private readonly tails = new Map<string, Promise<void>>()

  async run<T> (key: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve()
    let release!: () => void
    const mine = new Promise<void>(resolve => { release = resolve })
    // The next caller waits for us and, through us, for everyone before us.
    const tail = previous.then(() => mine)
    this.tails.set(key, tail)
    try {
      await waitOrAbort(previous, signal)
      return await fn()
    } finally {
      release()
      if (this.tails.get(key) === tail) this.tails.delete(key)
    }
  }
}

async function waitOrAbort (promise: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (signal === undefined) return await promise
  signal.throwIfAborted()
  let onAbort!: () => void
  const aborted = new Promise<never>((_resolve, reject) => {
    onAbort = () => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
  })
  try {
    await Promise.race([promise, aborted])
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
}
