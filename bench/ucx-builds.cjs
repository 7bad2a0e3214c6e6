#!/usr/bin/env node
// `kvwire bench` against both UCX builds in one command, one table: Debian's UCX 1.13 (build/) and
// PyPI's UCX 1.22 with CUDA transports (build-ucx122/, built by .ci/ucx-smoke.sh), each with the
// ucx_perftest of the same UCX as its baseline. Every other argument goes to `kvwire bench` as is.
//   node bench/ucx-builds.cjs [--builds 1.13,1.22] [kvwire bench options...]
// e.g. node bench/ucx-builds.cjs --transport shm,tcp --block 64K,1M,4M --runs 3 --latency-samples 0 --idle-seconds 0
'use strict';
const { takeOption, runBenchJson, formatSize: size, buildEnv } = require('./run-bench.cjs');
const { carrierSummary } = require('../dist/cli/carriers');

const taken = takeOption(process.argv.slice(2), '--builds');
const args = taken.args;
const wanted = taken.value === undefined ? ['1.13', '1.22'] : taken.value.split(',').filter(Boolean);
for (const w of wanted.length ? wanted : [''])
  if (!['1.13', '1.22'].includes(w)) {
    console.error(`--builds: '${w}' is not one of 1.13, 1.22 (a comma-separated list)`);
    process.exit(2);
  }

const pct = (x) => (x === null || x === undefined ? 'n/a' : `${Math.round(x * 100)}%`);

(async () => {
  const results = {};
  const skipped = [];
  for (const version of wanted) {
    const b = buildEnv(version);
    if (b.skipped) {
      console.log(`UCX ${version}: skipped: ${b.skipped}`);
      skipped.push(version);
      continue;
    }
    try {
      results[version] = await runBenchJson(`UCX ${version}`, args, b.env);
    } catch (e) {
      console.log(`UCX ${version}: failed: ${e.message}`);
      skipped.push(version);
    }
  }
  const versions = Object.keys(results);
  if (!versions.length) process.exit(1);
  // The descriptor-rate cell (10,000 x 64 B WRITE) is its own row, even next to a --block 64 --batch 10000 sweep cell.
  const key = (c) => `${c.transport}|${c.memory}|${c.pattern}|${c.op}|${c.block}|${c.batch}|${c.vs.perftest.skipped === 'descriptor-rate cell' ? 'rate' : ''}`;
  const rows = new Map();
  for (const v of versions)
    for (const c of results[v].cells) {
      const k = key(c);
      if (!rows.has(k)) rows.set(k, { transport: c.transport, memory: c.memory, pattern: c.pattern, op: c.op.toUpperCase(), block: size(c.block), batch: c.batch });
      const row = rows.get(k);
      row[`${v} path`] = c.path;
      row[`${v} GB/s`] = c.batch === 10_000 ? `${c.nsPerDescriptor} ns/desc` : c.gbps;
      row[`${v} vs perftest`] = c.vs.perftest.ratio === null ? 'n/a' : `${pct(c.vs.perftest.ratio)} ${c.vs.perftest.test}`;
      if (c.vs.socket.ratio !== null) row[`${v} vs socket`] = `${c.vs.socket.ratio.toFixed(1)}x`;
      if (c.vs.nixl) row[`${v} vs NIXL`] = c.vs.nixl.ratio === null ? 'n/a' : `${c.vs.nixl.ratio.toFixed(2)}x`;
    }
  if (versions.length === 2)
    for (const row of rows.values()) {
      const [x, y] = versions.map((v) => row[`${v} GB/s`]);
      if (typeof x === 'number' && typeof y === 'number' && x > 0) row[`${versions[1]} / ${versions[0]}`] = `${(y / x).toFixed(2)}x`;
    }
  console.log(`kvwire bench on UCX ${versions.map((v) => results[v].ucx).join(' and ')}, ${results[versions[0]].machine.cpus} CPUs`);
  console.table([...rows.values()]);
  // What carried each cell's blocks on each build: kvwire's own copy, or the protocol UCX selected.
  const carried = new Map();
  for (const v of versions)
    for (const c of results[v].cells) {
      const k = key(c);
      if (!carried.has(k)) carried.set(k, { transport: c.transport, memory: c.memory, op: c.op.toUpperCase(), block: size(c.block) });
      carried.get(k)[`UCX ${results[v].ucx}`] = (c.carriers ?? []).map(carrierSummary).join('; ');
    }
  console.log('What carried the blocks (UCX: its protocol for the data messages, from agent.connections()):');
  console.table([...carried.values()]);
  for (const v of versions) {
    console.log(`UCX ${results[v].ucx} targets:`);
    console.table(results[v].targets.map((t) => ({ id: t.id, case: t.case, target: t.target, measured: t.measured, met: t.met === null ? 'n/a' : t.met ? 'yes' : 'NO' })));
  }
  // A build asked for that did not run fails the comparison (exit 1), after what did run is shown.
  if (skipped.length) {
    console.log(`not compared: UCX ${skipped.join(', ')} did not run (see above)`);
    process.exitCode = 1;
  }
})().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
