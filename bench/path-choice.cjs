#!/usr/bin/env node
// Which path should 'auto' take? Runs `kvwire bench` once per path (`--path`), interleaved over
// rounds, on each UCX build asked for, quiet and (with --noisy) next to one process spinning a core,
// and prints per cell the medians, each path against the first one named after 'auto', and which
// path 'auto' took. This is the measurement behind the agent's choice between 'cma' and 'am' for
// registered memory on one host (kCmaSegmentMin in native/backends/ucx/ucx_backend.cc).
//   node bench/path-choice.cjs [--paths auto,am,cma] [--rounds 2] [--builds 1.13] [--noisy] [kvwire bench options...]
// e.g. node bench/path-choice.cjs --builds 1.13,1.22 --noisy --block 1K,4K,16K,64K,256K,1M
// Bench options default to --transport shm --memory registered --op write,read --runs 3.
'use strict';
const { takeOption, runBenchJson, formatSize: size, spinner, median, buildEnv } = require('./run-bench.cjs');

let args = process.argv.slice(2);
const option = (name, fallback) => {
  const t = takeOption(args, name);
  args = t.args;
  return t.value === undefined ? fallback : t.value;
};
const paths = option('--paths', 'auto,am,cma').split(',').filter(Boolean);
const rounds = Number(option('--rounds', '2'));
const builds = option('--builds', '1.13').split(',').filter(Boolean);
const noisyAt = args.indexOf('--noisy');
const noisy = noisyAt >= 0;
if (noisy) args.splice(noisyAt, 1);
if (!Number.isSafeInteger(rounds) || rounds < 1) throw new Error(`--rounds must be an integer >= 1, not '${rounds}'`);
if (paths.length < 2) throw new Error('--paths needs two paths or more to compare');
for (const b of builds) if (!['1.13', '1.22'].includes(b)) throw new Error(`--builds: '${b}' is not one of 1.13, 1.22`);
for (const p of paths) if (!['auto', 'direct', 'am', 'rma', 'cma'].includes(p)) throw new Error(`--paths: '${p}' is not a host-memory path`);
const defaults = { '--transport': 'shm', '--memory': 'registered', '--op': 'write,read', '--runs': '3' };
for (const [k, v] of Object.entries(defaults)) if (!args.some((a) => a === k || a.startsWith(`${k}=`))) args.push(k, v);
args.push('--latency-samples', '0', '--idle-seconds', '0', '--no-baselines');
const base = paths.find((p) => p !== 'auto');

(async () => {
  let printed = 0;
  for (const build of builds) {
    const b = buildEnv(build);
    if (b.skipped) {
      console.log(`UCX ${build}: skipped: ${b.skipped}`);
      continue;
    }
    const modes = noisy ? ['quiet', 'noisy'] : ['quiet'];
    const rows = new Map(); // cell -> { mode|path -> [GB/s or ns per descriptor], auto path }
    let ucx = '';
    for (let r = 0; r < rounds; r++)
      for (const mode of modes)
        for (const p of paths) {
          const n = mode === 'noisy' ? spinner() : null;
          let result;
          try {
            result = await runBenchJson(`UCX ${build}, ${mode}, path ${p}, round ${r + 1}/${rounds}`, [...args, '--path', p], b.env);
          } finally {
            n?.kill('SIGKILL');
          }
          ucx = result.ucx;
          for (const c of result.cells) {
            const k = `${c.transport}|${c.memory}|${c.pattern}|${c.op}|${c.block}|${c.batch}`;
            if (!rows.has(k)) rows.set(k, { cell: c, values: {}, auto: new Set() });
            const row = rows.get(k);
            const perDescriptor = c.block === 64 && c.batch === 10_000; // the bench's descriptor-rate cell
            (row.values[`${mode}|${p}`] ??= []).push(...(perDescriptor ? [c.nsPerDescriptor] : c.runsGbps));
            if (p === 'auto') row.auto.add(c.path);
            else if (c.path !== p) throw new Error(`cell ${k} asked for path '${p}' and went by '${c.path}'`);
          }
        }
    const table = [...rows.values()].map(({ cell: c, values, auto }) => {
      const perDescriptor = c.block === 64 && c.batch === 10_000;
      const row = { cell: `${c.transport} ${c.memory} ${c.pattern}`, op: c.op.toUpperCase(), block: `${size(c.block)} x ${c.batch}`, unit: perDescriptor ? 'ns/desc' : 'GB/s' };
      if (paths.includes('auto')) row['auto took'] = [...auto].join('/');
      for (const mode of modes)
        for (const p of paths) {
          const m = median(values[`${mode}|${p}`]);
          row[`${mode} ${p}`] = +m.toFixed(perDescriptor ? 0 : 2);
          if (p !== base && p !== 'auto') {
            const ratio = perDescriptor ? median(values[`${mode}|${base}`]) / m : m / median(values[`${mode}|${base}`]);
            row[`${mode} ${p}/${base}`] = `${ratio.toFixed(2)}x`;
          }
        }
      if (noisy)
        for (const p of paths) {
          const [q, n] = [median(values[`quiet|${p}`]), median(values[`noisy|${p}`])];
          row[`${p} kept`] = `${Math.round((perDescriptor ? q / n : n / q) * 100)}%`; // throughput kept
        }
      return row;
    });
    console.log(`UCX ${ucx}: paths ${paths.join(', ')}; medians over ${rounds} round(s) x --runs; x = throughput against '${base}' (ns per descriptor: '${base}' ÷ path)`);
    console.table(table);
    printed++;
  }
  if (!printed) process.exit(1); // every build skipped: nothing measured
})().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
