/**
 * A private network of namespaces for real runs: one namespace holds a bridge,
 * and every host (the origin, each agent, each bad peer) gets its own namespace
 * with a veth pair into that bridge and an address in 10.77.0.0/16. Nothing is
 * bound on, or routed to, the host's own addresses; deleting the namespaces
 * deletes every link with them.
 *
 * Links are shaped with tbf in both directions: egress of the host's end is its
 * uplink, egress of the bridge's end is its downlink. This kernel has no netem
 * (and no fq for EDT delays), so tbf adds no latency of its own; link latency is
 * applied only in the model, and origin latency by the origin process itself.
 *
 * Processes join a namespace with `nsenter --net=/run/netns/NAME`, which changes
 * the network namespace only: `ip netns exec` would also unshare the mount
 * namespace, and FUSE mounts made by an agent would be invisible to a `shoal
 * run` started by another `ip netns exec`.
 */
import { readdir } from 'node:fs/promises'
import { exec } from './proc.ts'

const PREFIX = 'shoalsim-'
const NETNS_DIR = '/run/netns'

export interface NetHost {
  /** The namespace name. */
  ns: string
  ip: string
  /** Prepends nsenter for this host's namespace to a command line. */
  wrap (command: string[]): string[]
}

export class Network {
  /** Namespaces of this process start with this, so teardown (and tests) can find every one. */
  readonly prefix: string
  private readonly bridgeNs: string
  private readonly hosts: NetHost[] = []
  private destroyed = false

  private constructor (prefix: string) {
    this.prefix = prefix
    this.bridgeNs = `${prefix}br`
  }

  /** The bridge namespace. Call destroy() in a finally block, whatever happens after. */
  static async create (tag: string): Promise<Network> {
    const net = new Network(`${PREFIX}${process.pid}-${tag}-`)
    try {
      await ip(['netns', 'add', net.bridgeNs])
      await ip(['-n', net.bridgeNs, 'link', 'add', 'br0', 'type', 'bridge'])
      await ip(['-n', net.bridgeNs, 'link', 'set', 'br0', 'up'])
    } catch (err) {
      await net.destroy()
      throw err
    }
    return net
  }

  /**
   * A host in its own namespace, plugged into the bridge, its link shaped to MBIT
   * each way (undefined: unshaped). INDEX picks its address and must be unique.
   */
  async addHost (name: string, index: number, mbit: number | undefined): Promise<NetHost> {
    if (index < 0 || index >= 250 * 256) throw new RangeError(`host index ${index} does not fit 10.77.0.0/16`)
    const ns = `${this.prefix}${name}`
    const port = `p${index}` // the bridge's end, named in the bridge namespace only
    const address = `10.77.${Math.floor(index / 250)}.${(index % 250) + 1}`
    await ip(['netns', 'add', ns])
    const host: NetHost = { ns, ip: address, wrap: command => ['nsenter', `--net=${NETNS_DIR}/${ns}`, '--', ...command] }
    this.hosts.push(host)
    await ip(['-n', ns, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', port, 'netns', this.bridgeNs])
    await ip(['-n', this.bridgeNs, 'link', 'set', port, 'master', 'br0', 'up'])
    await ip(['-n', ns, 'addr', 'add', `${address}/16`, 'dev', 'eth0'])
    await ip(['-n', ns, 'link', 'set', 'eth0', 'up'])
    await ip(['-n', ns, 'link', 'set', 'lo', 'up'])
    if (mbit !== undefined) {
      await shape(ns, 'eth0', mbit)
      await shape(this.bridgeNs, port, mbit)
    }
    return host
  }

  /** Deletes every namespace of this network (their links go with them). Safe to call twice. */
  async destroy (): Promise<void> {
    if (this.destroyed) return
    this.destroyed = true
    await removeNamespaces(name => name.startsWith(this.prefix))
  }
}

/**
 * tbf at MBIT: the bucket holds 10 ms of traffic (at least 64 KiB, so a full
 * GSO segment passes), and packets wait at most 200 ms in its queue.
 */
async function shape (ns: string, dev: string, mbit: number): Promise<void> {
  const burst = Math.max(64 * 1024, Math.round(mbit * 125_000 / 100))
  await exec('tc', ['-n', ns, 'qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', `${mbit}mbit`, 'burst', String(burst), 'latency', '200ms'])
}

async function ip (args: string[]): Promise<void> {
  await exec('ip', args, { timeoutMs: 10_000 })
}

/** Names of the simulator's namespaces that exist now (any process). */
export async function simNamespaces (): Promise<string[]> {
  const names = await readdir(NETNS_DIR).catch(() => [] as string[])
  return names.filter(n => n.startsWith(PREFIX))
}

/** Deletes the namespaces left by simulator processes that are gone (a crash, a kill -9 of the runner). */
export async function removeStaleNamespaces (): Promise<number> {
  return await removeNamespaces(name => {
    const pid = Number(/^shoalsim-(\d+)-/.exec(name)?.[1])
    if (!Number.isInteger(pid)) return false
    try {
      process.kill(pid, 0)
      return false
    } catch {
      return true
    }
  })
}

async function removeNamespaces (match: (name: string) => boolean): Promise<number> {
  const doomed = (await simNamespaces()).filter(match)
  const results = await Promise.allSettled(doomed.map(async name => await ip(['netns', 'del', name])))
  const failed = results.flatMap((r, i) => r.status === 'rejected' ? [`${doomed[i]}: ${(r.reason as Error).message}`] : [])
  if (failed.length > 0) throw new Error(`could not delete network namespaces:\n${failed.join('\n')}`)
  return doomed.length
}

/** Whether this machine lets us create network namespaces (root, iproute2); the reason when not. */
export async function netnsSupport (): Promise<{ ok: true } | { ok: false, reason: string }> {
  const probe = `${PREFIX}${process.pid}-probe`
  try {
    await ip(['netns', 'add', probe])
    await ip(['netns', 'del', probe])
    await exec('nsenter', ['--version'])
    return { ok: true }
  } catch (err) {
    return { ok: false, reason: (err as Error).message }
  }
}
