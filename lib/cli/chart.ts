// The SVG chart of `kvwire bench --svg`: GB/s against block size (log scale), one panel per
// transport, kvwire's pairwise cells as solid lines and their baselines dashed or dotted.
import type { BenchResult } from './bench';

const COLORS: Record<string, string> = {
  'allocated write': '#1f77b4',
  'allocated read': '#17becf',
  'registered write': '#d62728',
  'registered read': '#ff7f0e',
};
const W = 520;
const H = 360;
const M = { left: 56, right: 16, top: 36, bottom: 48 };

const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
const label = (n: number) => (n >= 1 << 20 ? `${n >> 20}M` : n >= 1024 ? `${n >> 10}K` : `${n}`);

interface Series {
  name: string;
  color: string;
  dash?: string;
  points: [number, number][];
}

function panel(title: string, series: Series[], x0: number): string {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  if (!xs.length) return '';
  const lo = Math.log2(Math.min(...xs));
  const hi = Math.max(lo + 1, Math.log2(Math.max(...xs)));
  const top = Math.max(0.1, ...ys) * 1.1;
  const px = (x: number) => x0 + M.left + ((Math.log2(x) - lo) / (hi - lo)) * (W - M.left - M.right);
  const py = (y: number) => M.top + (1 - y / top) * (H - M.top - M.bottom);
  const parts: string[] = [`<text x="${x0 + W / 2}" y="20" text-anchor="middle" font-weight="bold">${esc(title)}</text>`];
  for (let i = 0; i <= 4; i++) {
    const y = (top * i) / 4;
    parts.push(`<line x1="${x0 + M.left}" x2="${x0 + W - M.right}" y1="${py(y)}" y2="${py(y)}" stroke="#ddd"/>`,
      `<text x="${x0 + M.left - 6}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(1)}</text>`);
  }
  for (const x of [...new Set(xs)].sort((a, b) => a - b))
    parts.push(`<text x="${px(x)}" y="${H - M.bottom + 16}" text-anchor="middle">${label(x)}</text>`);
  parts.push(`<text x="${x0 + 14}" y="${M.top + (H - M.top - M.bottom) / 2}" transform="rotate(-90 ${x0 + 14} ${M.top + (H - M.top - M.bottom) / 2})" text-anchor="middle">GB/s</text>`,
    `<text x="${x0 + W / 2}" y="${H - 12}" text-anchor="middle">block size (bytes)</text>`);
  for (const s of series) {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]).map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ');
    parts.push(`<polyline fill="none" stroke="${s.color}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ''} points="${pts}"><title>${esc(s.name)}</title></polyline>`);
  }
  return parts.join('\n');
}

export function chartSvg(r: BenchResult): string {
  const transports = [...new Set(r.cells.map((c) => c.transport))];
  const panels: string[] = [];
  const legend = new Map<string, Series>();
  transports.forEach((t, i) => {
    const cells = r.cells.filter((c) => c.transport === t && c.pattern === 'pairwise' && !(c.block === 64 && c.batch === 10_000));
    const series: Series[] = [];
    for (const key of Object.keys(COLORS)) {
      const [memory, op] = key.split(' ');
      const mine = cells.filter((c) => c.memory === memory && c.op === op);
      if (!mine.length) continue;
      series.push({ name: `kvwire ${key}`, color: COLORS[key], points: mine.map((c) => [c.block, c.gbps]) });
      const base = r.baselines.perftest.filter((p) => p.transport === t && p.memory === memory && p.op === op && 'gbps' in p);
      if (base.length)
        series.push({ name: `ucx_perftest ${(base[0] as any).test} (${memory} ${op})`, color: COLORS[key], dash: '6 4', points: base.map((p) => [p.block, (p as any).gbps]) });
    }
    const blocks = new Set(cells.map((c) => c.block));
    for (const op of ['write', 'read']) {
      const sock = r.baselines.socket.filter((s) => s.op === op && 'gbps' in s && blocks.has(s.block));
      if (sock.length) series.push({ name: `Node net socket ${op}`, color: op === 'write' ? '#555' : '#999', dash: '2 3', points: sock.map((s) => [s.block, (s as any).gbps]) });
    }
    const mc = r.baselines.memcpy.filter((m) => blocks.has(m.block));
    if (mc.length) series.push({ name: 'memcpy, one thread', color: '#000', dash: '1 3', points: mc.map((m) => [m.block, m.gbps]) });
    for (const s of series) legend.set(s.name, s);
    panels.push(panel(`${t}${r.remote ? ' (remote target)' : ''}, pairwise`, series, i * W));
  });
  const width = Math.max(1, transports.length) * W;
  const entries = [...legend.values()];
  const rows = Math.ceil(entries.length / 3);
  const legendSvg = entries.map((s, i) => {
    const x = 20 + (i % 3) * (width / 3);
    const y = H + 16 + Math.floor(i / 3) * 18;
    return `<line x1="${x}" x2="${x + 28}" y1="${y}" y2="${y}" stroke="${s.color}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ''}/><text x="${x + 34}" y="${y + 4}">${esc(s.name)}</text>`;
  });
  const height = H + 24 + rows * 18;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
${panels.join('\n')}
${legendSvg.join('\n')}
<text x="${width - 8}" y="${height - 6}" text-anchor="end" fill="#777">kvwire ${esc(r.kvwire)}, UCX ${esc(r.ucx)}, ${r.machine.cpus} cores, ${esc(r.startedAt)}</text>
</svg>
`;
}
