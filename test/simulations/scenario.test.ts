import assert from 'node:assert/strict'
import { readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, it } from 'node:test'
import { arrivalTimes, killedNodes, loadScenario, parseScenario, ScenarioError } from '../../simulations/lib/scenario.ts'

const SCENARIOS = join(import.meta.dirname, '..', '..', 'simulations', 'scenarios')

describe('simulation scenarios', () => {
  it('every scenario file in simulations/scenarios parses', async () => {
    const files = (await readdir(SCENARIOS)).filter(f => f.endsWith('.json'))
    assert.ok(files.length >= 5)
    for (const f of files) await loadScenario(join(SCENARIOS, f))
  })

  it('fills defaults and names the field that is wrong', () => {
    const s = parseScenario({}, 'x')
    assert.equal(s.nodes, 3)
    assert.equal(s.timeouts.chunkMs, 20_000)
    assert.throws(() => parseScenario({ nodez: 3 }, 'x'), /unknown scenario key "nodez"/)
    assert.throws(() => parseScenario({ links: { mbit: 0, latencyMs: 0 } }, 'x'), /links.mbit must be a positive number/)
    assert.throws(() => parseScenario({ faults: { kill: { share: 2, atMs: 0 } } }, 'x'), ScenarioError)
    assert.throws(() => parseScenario({ faults: { originOutage: { fromMs: 5, toMs: 1 } } }, 'x'), /toMs must be after fromMs/)
    assert.throws(() => parseScenario({ faults: { hostilePeers: { share: 1.5 } } }, 'x'), /faults.hostilePeers.share must be a number from 0 to 1/)
    assert.throws(() => parseScenario({ faults: { floods: {} } }, 'x'), /unknown fault "floods" \(known: kill, originOutage, badPeers, hostilePeers\)/)
    assert.throws(() => parseScenario({ origin: { mbit: 1, latencyMs: 0, kind: 'ftp' } }, 'x'), /origin.kind must be "oci-layout" or "registry"/)
    // Objects whose fields default one by one; anything else there is refused, not replaced by the defaults.
    assert.deepEqual(parseScenario({ links: { mbit: 50 } }, 'x').links, { mbit: 50, latencyMs: 0 })
    assert.equal(parseScenario({ origin: { latencyMs: 3 } }, 'x').origin.mbit, 100)
    assert.throws(() => parseScenario({ links: null }, 'x'), /links must be an object, e.g. \{"mbit":1000,"latencyMs":0\}/)
    assert.throws(() => parseScenario({ timeouts: 5 }, 'x'), /timeouts must be an object/)
    assert.throws(() => parseScenario({ model: [] }, 'x'), /model must be an object/)
  })

  it('arrivals and killed nodes are seeded: the model and a real run see the same ones', () => {
    const poisson = parseScenario({ nodes: 50, arrival: { type: 'poisson', ratePerSec: 10 }, seed: 7 }, 'x')
    const times = arrivalTimes(poisson)
    assert.deepEqual(arrivalTimes(poisson), times)
    assert.ok(times.every((t, i) => i === 0 || t >= times[i - 1]!))
    const mean = times[49]! / 49
    assert.ok(mean > 50 && mean < 200, `mean gap ${mean} ms for 10 per second`)
    assert.deepEqual(arrivalTimes(parseScenario({ nodes: 3, arrival: { type: 'staggered', intervalMs: 100 } }, 'x')), [0, 100, 200])
    const kill = parseScenario({ nodes: 20, faults: { kill: { share: 0.3, atMs: 0 } } }, 'x')
    assert.equal(killedNodes(kill).length, 6)
    assert.deepEqual(killedNodes(kill), killedNodes(kill))
  })
})
