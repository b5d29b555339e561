/**
 * A small SVG chart writer: line charts (for CDFs and time series) and stacked
 * bar charts, with "nice" axis ticks and a legend. No dependencies; the output
 * is plain SVG 1.1 that browsers and GitHub render.
 */

export interface Series { name: string, points: Array<[number, number]>, dashed?: boolean }
export interface Bar { label: string, parts: number[] }

const W = 760
const H = 420
const M = { left: 70, right: 170, top: 40, bottom: 60 }
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#7f7f7f']

export function lineChart (options: { title: string, xLabel: string, yLabel: string, series: Series[], yMax?: number }): string {
  const xs = options.series.flatMap(s => s.points.map(p => p[0]))
  const ys = options.series.flatMap(s => s.points.map(p => p[1]))
  const x = axis(0, Math.max(1e-9, ...xs), M.left, W - M.right)
  const y = axis(0, options.yMax ?? Math.max(1e-9, ...ys), H - M.bottom, M.top)
  const lines = options.series.map((s, i) => {
    const d = s.points.map(([px, py], j) => `${j === 0 ? 'M' : 'L'}${x.at(px).toFixed(1)},${y.at(py).toFixed(1)}`).join(' ')
    return `<path d="${d}" fill="none" stroke="${COLORS[i % COLORS.length]}" stroke-width="2"${s.dashed === true ? ' stroke-dasharray="6 4"' : ''}/>`
  })
  return frame(options.title, options.xLabel, options.yLabel, x, y, lines, options.series.map(s => s.name))
}

/** Bars of stacked parts (one value per entry of `parts`), e.g. bytes by source per node. */
export function stackedBarChart (options: { title: string, xLabel: string, yLabel: string, parts: string[], bars: Bar[] }): string {
  const n = Math.max(1, options.bars.length)
  const y = axis(0, Math.max(1e-9, ...options.bars.map(b => b.parts.reduce((a, v) => a + v, 0))), H - M.bottom, M.top)
  const slot = (W - M.left - M.right) / n
  const rects: string[] = []
  for (const [i, bar] of options.bars.entries()) {
    let base = 0
    for (const [j, v] of bar.parts.entries()) {
      if (v <= 0) continue
      const top = y.at(base + v)
      rects.push(`<rect x="${(M.left + i * slot + slot * 0.1).toFixed(1)}" y="${top.toFixed(1)}" width="${(slot * 0.8).toFixed(1)}" height="${(y.at(base) - top).toFixed(1)}" fill="${COLORS[j % COLORS.length]}"><title>${esc(bar.label)}: ${esc(options.parts[j]!)} ${v.toFixed(2)}</title></rect>`)
      base += v
    }
  }
  // Label every k-th bar so labels never overlap.
  const every = Math.ceil(n / 20)
  const labels = options.bars.map((b, i) => i % every === 0
    ? `<text x="${(M.left + (i + 0.5) * slot).toFixed(1)}" y="${H - M.bottom + 16}" font-size="10" text-anchor="middle">${esc(b.label)}</text>`
    : '')
  return frame(options.title, options.xLabel, options.yLabel, undefined, y, [...rects, ...labels], options.parts)
}

interface Axis { at (v: number): number, ticks: number[] }

/** A linear axis from lo to a rounded-up hi, mapped onto pixels [p0, p1], with 1-2-5 ticks. */
function axis (lo: number, hi: number, p0: number, p1: number): Axis {
  const step = niceStep((hi - lo) / 5)
  const top = Math.ceil(hi / step) * step
  const ticks: number[] = []
  for (let v = lo; v <= top + step / 2; v += step) ticks.push(v)
  return { at: v => p0 + (v - lo) / (top - lo) * (p1 - p0), ticks }
}

function niceStep (raw: number): number {
  const p = 10 ** Math.floor(Math.log10(raw))
  const f = raw / p
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p
}

function frame (title: string, xLabel: string, yLabel: string, x: Axis | undefined, y: Axis, body: string[], legend: string[]): string {
  const grid = y.ticks.map(t => `<line x1="${M.left}" x2="${W - M.right}" y1="${y.at(t).toFixed(1)}" y2="${y.at(t).toFixed(1)}" stroke="#ddd"/>` +
    `<text x="${M.left - 6}" y="${(y.at(t) + 4).toFixed(1)}" font-size="11" text-anchor="end">${fmt(t)}</text>`)
  const xticks = (x?.ticks ?? []).map(t => `<text x="${x!.at(t).toFixed(1)}" y="${H - M.bottom + 16}" font-size="11" text-anchor="middle">${fmt(t)}</text>`)
  const keys = legend.map((name, i) => `<rect x="${W - M.right + 15}" y="${M.top + i * 20}" width="12" height="12" fill="${COLORS[i % COLORS.length]}"/>` +
    `<text x="${W - M.right + 32}" y="${M.top + i * 20 + 10}" font-size="12">${esc(name)}</text>`)
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" font-size="15" text-anchor="middle">${esc(title)}</text>`,
    ...grid, ...xticks, ...body,
    `<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${H - M.bottom}" stroke="black"/>`,
    `<line x1="${M.left}" x2="${W - M.right}" y1="${H - M.bottom}" y2="${H - M.bottom}" stroke="black"/>`,
    `<text x="${(M.left + W - M.right) / 2}" y="${H - 18}" font-size="12" text-anchor="middle">${esc(xLabel)}</text>`,
    `<text x="18" y="${(M.top + H - M.bottom) / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 18 ${(M.top + H - M.bottom) / 2})">${esc(yLabel)}</text>`,
    ...keys,
    '</svg>'
  ].join('\n') + '\n'
}

function fmt (v: number): string {
  return Math.abs(v) >= 1000 ? v.toExponential(1) : Number(v.toPrecision(4)).toString()
}

function esc (s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
}
