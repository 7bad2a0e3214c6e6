#!/usr/bin/env node
// P4 of the performance issue: how much of its quiet-machine throughput each `kvwire bench` cell
// keeps when one other process spins a core. Runs the same bench quiet and noisy, alternating, and
// prints per cell the medians and noisy ÷ quiet. Every other argument goes to `kvwire bench`.
// With --perftest the bench's ucx_perftest baselines run in both modes too, and each cell also shows
// what UCX's own test kept next to the same spinner (tag_bw -e: peer error handling, as kvwire).
// Over shm next to the spinner tag_bw may not finish: each such baseline gives up after 5 x 120 s.
//   node bench/noisy-neighbour.cjs [--rounds 2] [--perftest] [kvwire bench options...]
// e.g. node bench/noisy-neighbour.cjs --transport shm,tcp --memory allocated,registered --block 64K,1M,4M --runs 3
'use strict';
const { takeOption, runBenchJson, formatSize: size, spinner, median } = require('./run-bench.cjs');

const withPerftest = process.argv.includes('--perftest');
const taken = takeOption(process.argv.slice(2).filter((a) => a !== '--perftest'), '--rounds');
const args = taken.args;
const rounds = taken.value === undefined ? 2 : Number(taken.value);
if (!Number.isSafeInteger(rounds) || rounds < 1) {
  console.error(`--rounds must be an integer >= 1, not '${taken.value}'`);
  process.exit(2);
}

const bench = (label) =>
  runBenchJson(label, ['--latency-samples', '0', '--idle-seconds', '0', ...(withPerftest ? [] : ['--no-baselines']), ...args], { NODE_NO_WARNINGS: '1' });

(async () => {
  const runs = { quiet: [], noisy: [] };
  for (let r = 0; r < rounds; r++) {
    runs.quiet.push(await bench(`quiet, round ${r + 1}/${rounds}`));
    const n = spinner();
    try {
      runs.noisy.push(await bench(`one busy neighbour, round ${r + 1}/${rounds}`));
    } finally {
      n.kill('SIGKILL');
    }
  }
  const key = (c) => `${c.transport}|${c.memory}|${c.pattern}|${c.op}|${c.block}|${c.batch}`;
  const rows = new Map();
  for (const mode of ['quiet', 'noisy'])
    for (const result of runs[mode])
      for (const c of result.cells) {
        if (c.batch === 10_000) continue; // the descriptor-rate cell measures latency, not bandwidth
        const k = key(c);
        if (!rows.has(k)) rows.set(k, { cell: c, quiet: [], noisy: [], paths: new Set(), perftest: { quiet: [], noisy: [] }, errh: { quiet: [], noisy: [] } });
        const row = rows.get(k);
        row[mode].push(...c.runsGbps);
        row.paths.add(c.path);
        // UCX's own test on the same cell in the same mode: plain, and with peer error handling (-e).
        const pt = result.baselines.perftest.find((p) => p.transport === c.transport && p.memory === c.memory && p.op === c.op && p.block === c.block && 'gbps' in p);
        if (pt) row.perftest[mode].push(...pt.runs);
        const pe = (result.baselines.perftestErrh ?? []).find((p) => p.transport === c.transport && p.memory === c.memory && p.block === c.block && 'gbps' in p);
        if (pe) row.errh[mode].push(...pe.runs);
      }
  const kept = (x) => (x.quiet.length && x.noisy.length ? `${Math.round((median(x.noisy) / median(x.quiet)) * 100)}%` : 'n/a');
  const table = [...rows.values()].map(({ cell: c, quiet, noisy, paths, perftest, errh }) => {
    const q = median(quiet);
    const n = median(noisy);
    return {
      transport: c.transport, memory: c.memory, op: c.op.toUpperCase(), block: size(c.block), path: [...paths].join('/'),
      'quiet GB/s': +q.toFixed(2), 'noisy GB/s': +n.toFixed(2), kept: `${Math.round((n / q) * 100)}%`, 'P4 (>= 70%)': n / q >= 0.7 ? 'met' : 'MISSED',
      ...(withPerftest ? { 'perftest kept': `${kept(perftest)} ${c.vs.perftest.test}`, 'tag_bw -e kept': kept(errh) } : {}),
    };
  });
  console.log(`kvwire bench quiet vs one busy neighbour process (medians of ${rounds} x --runs per cell), UCX ${runs.quiet[0].ucx}, ${runs.quiet[0].machine.cpus} CPUs`);
  console.table(table);
})().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
