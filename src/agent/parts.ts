import { errorText, type Logger } from '../util/log.ts'

/**
 * A node's parts, started one after another, each registered with its closer as
 * soon as it has started, and closed in reverse order: on `stop`, and when a later
 * part fails to start (so a failure part-way leaves no libp2p node, socket, SQLite
 * handle or mount behind). A part whose own start fails must clean up after itself;
 * the parts before it are closed here. (libp2p's components object is the model:
 * each part gets what it needs, built before it, at construction.)
 */
export class Parts {
  private readonly log: Logger
  private readonly started: Array<{ name: string, close: () => Promise<void> | void }> = []
  private stopping: Promise<void> | undefined

  constructor (log: Logger) {
    this.log = log
  }

  /** Names of the parts started and not closed, in start order. */
  get names (): string[] {
    return this.started.map(p => p.name)
  }

  /** Starts a part with START and registers CLOSE for it. Refused once stopping. */
  async start<T> (name: string, start: () => Promise<T> | T, close: (part: T) => Promise<void> | void): Promise<T> {
    if (this.stopping !== undefined) throw new Error(`cannot start ${name}: the node is stopping`)
    const part = await start()
    this.started.push({ name, close: async () => await close(part) })
    if (this.stopping !== undefined) {
      // stop() ran while this part was starting: close it too, and do not hand it out.
      await this.stopping
      await this.closeAll()
      throw new Error(`${name} started while the node was stopping; closed it again`)
    }
    return part
  }

  /** Closes every started part, the last started first; a closer that fails is logged and the rest still close. Idempotent. */
  async stop (): Promise<void> {
    this.stopping ??= this.closeAll()
    await this.stopping
  }

  private async closeAll (): Promise<void> {
    for (let part = this.started.pop(); part !== undefined; part = this.started.pop()) {
      try {
        await part.close()
      } catch (err) {
        this.log.warn({ part: part.name, err: errorText(err) }, 'closing a part failed')
      }
    }
  }
}
