/**
 * Links for the model: each node has an uplink and a downlink, the origin has
 * one egress, and each is a server of a fixed rate that sends data in pieces
 * (64 KiB by default), taking turns among the transfers that have a piece
 * ready (round robin). A transfer crosses two of them: its sender's egress,
 * then, after the link latency, its receiver's downlink.
 *
 * Why this gives fair sharing without solving for rates: every server splits
 * its rate equally among the transfers it has work for, and a transfer held
 * up at the receiver stops getting pieces at the sender once `windowBytes` of
 * it wait there (TCP's window, roughly), so the sender's rate goes to the
 * others. The result is close to max-min fairness, and the cost is two events
 * per piece, independent of how many transfers share a link.
 */
import type { Simulator } from './des.ts'

export class Link {
  readonly name: string
  /** Bytes sent so far, by this link (as a sender or a receiver). */
  bytes = 0
  readonly transfers = new Set<Transfer>()
  private readonly bytesPerMs: number
  private readonly sim: Simulator
  private readonly ring = new Ring<Transfer>()
  private busy = false

  constructor (sim: Simulator, name: string, bytesPerSecond: number) {
    this.sim = sim
    this.name = name
    this.bytesPerMs = bytesPerSecond / 1000
  }

  /** Puts T in line for this link (it has a piece ready here). */
  enqueue (t: Transfer): void {
    this.ring.push(t)
    this.kick()
  }

  private kick (): void {
    if (this.busy) return
    let t = this.ring.shift()
    while (t !== undefined && !t.wants(this)) t = this.ring.shift()
    if (t === undefined) return
    const amount = t.take(this)
    this.busy = true
    const transfer = t
    this.sim.atQuiet(this.sim.now + amount / this.bytesPerMs, () => {
      this.busy = false
      this.bytes += amount
      transfer.sent(this, amount)
      this.kick()
    })
  }
}

/** One message of BYTES from `from` to `to`. `done` resolves when the last byte arrived. */
export class Transfer {
  readonly done: Promise<void>
  private readonly sim: Simulator
  private readonly from: Link
  private readonly to: Link
  private readonly latencyMs: number
  private readonly pieceBytes: number
  private readonly windowBytes: number
  private readonly onProgress: ((bytes: number) => void) | undefined
  private readonly total: number
  /** Bytes the sender has still to send, bytes waiting at the receiver, bytes still to arrive. */
  private toSend: number
  private atReceiver = 0
  private toArrive: number
  private queuedAtSender = false
  private queuedAtReceiver = false
  private finished = false
  private resolve!: () => void
  private reject!: (err: Error) => void

  /** `onProgress` is told of each piece as it arrives (a quiet event: it must call sim.wake() if it settles a promise). */
  constructor (sim: Simulator, from: Link, to: Link, bytes: number, options: { latencyMs: number, pieceBytes: number, windowBytes?: number, onProgress?: (bytes: number) => void }) {
    this.sim = sim
    this.from = from
    this.to = to
    this.latencyMs = options.latencyMs
    this.pieceBytes = options.pieceBytes
    this.windowBytes = options.windowBytes ?? 4 * options.pieceBytes
    this.onProgress = options.onProgress
    this.total = bytes
    this.toSend = bytes
    this.toArrive = bytes
    this.done = new Promise((resolve, reject) => {
      this.resolve = resolve
      this.reject = reject
    })
    this.done.catch(() => {}) // an aborted transfer nobody waits for is fine
    from.transfers.add(this)
    to.transfers.add(this)
    if (bytes === 0) this.sim.at(this.sim.now + this.latencyMs, () => this.finish())
    else this.queueAtSender()
  }

  /** Whether the sender has started: after that, the bytes are in the socket and go out whatever happens. */
  get started (): boolean {
    return this.toSend < this.total
  }

  /** Stops it (the sender or receiver died, or nobody wants it): `done` rejects. */
  abort (reason: Error): void {
    if (this.finished) return
    this.finished = true
    this.detach()
    this.sim.wake()
    this.reject(reason)
  }

  /** Link calls: is there a piece for LINK now? */
  wants (link: Link): boolean {
    if (this.finished) return false
    if (link === this.from) {
      this.queuedAtSender = false
      return this.toSend > 0 && this.atReceiver < this.windowBytes
    }
    this.queuedAtReceiver = false
    return this.atReceiver > 0
  }

  take (link: Link): number {
    if (link === this.from) {
      const n = Math.min(this.pieceBytes, this.toSend)
      this.toSend -= n
      return n
    }
    return Math.min(this.pieceBytes, this.atReceiver)
  }

  sent (link: Link, amount: number): void {
    if (this.finished) return
    if (link === this.from) {
      const arrive = (): void => {
        if (this.finished) return
        this.atReceiver += amount
        this.queueAtReceiver()
      }
      if (this.latencyMs > 0) this.sim.atQuiet(this.sim.now + this.latencyMs, arrive)
      else arrive()
      this.queueAtSender()
      return
    }
    this.atReceiver -= amount
    this.toArrive -= amount
    this.onProgress?.(amount)
    if (this.toArrive <= 0) this.finish()
    else {
      this.queueAtReceiver()
      this.queueAtSender() // the window opened
    }
  }

  private queueAtSender (): void {
    if (!this.queuedAtSender && this.toSend > 0 && this.atReceiver < this.windowBytes) {
      this.queuedAtSender = true
      this.from.enqueue(this)
    }
  }

  private queueAtReceiver (): void {
    if (!this.queuedAtReceiver && this.atReceiver > 0) {
      this.queuedAtReceiver = true
      this.to.enqueue(this)
    }
  }

  private finish (): void {
    if (this.finished) return
    this.finished = true
    this.detach()
    this.sim.wake()
    this.resolve()
  }

  private detach (): void {
    this.from.transfers.delete(this)
    this.to.transfers.delete(this)
  }
}

/** A FIFO queue with O(1) push and shift (a growable circular buffer). */
class Ring<T> {
  private items: Array<T | undefined> = new Array(16)
  private head = 0
  private count = 0

  push (item: T): void {
    if (this.count === this.items.length) {
      const bigger: Array<T | undefined> = new Array(this.items.length * 2)
      for (let i = 0; i < this.count; i++) bigger[i] = this.items[(this.head + i) % this.items.length]
      this.items = bigger
      this.head = 0
    }
    this.items[(this.head + this.count) % this.items.length] = item
    this.count++
  }

  shift (): T | undefined {
    if (this.count === 0) return undefined
    const item = this.items[this.head]
    this.items[this.head] = undefined
    this.head = (this.head + 1) % this.items.length
    this.count--
    return item
  }
}
