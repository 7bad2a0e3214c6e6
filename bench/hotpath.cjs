#!/usr/bin/env node
// tinybench microbenchmarks of kvwire's hot path, so per-descriptor overhead is a number we watch:
// building a 10,000-entry DescriptorList, and posting 10,000 x 64 B to completion in JS on each path.
// Both agents live in this process (shared memory); median latency per task, and ns per descriptor.
//   node bench/hotpath.cjs [--time 1000]
'use strict';
const { parseArgs } = require('node:util');
const { Bench } = require('tinybench');
const { Agent } = require('../dist');

const { values: opt } = parseArgs({ options: { time: { type: 'string', default: '1000' } } });
const N = 10_000;
const SIZE = 64;

(async () => {
  const a = await Agent.create({ name: 'hot-a', ucx: { transports: 'shm,self' } });
  const b = await Agent.create({ name: 'hot-b', ucx: { transports: 'shm,self' } });
  const la = a.allocate(N * SIZE * 2, { name: 'l' });
  const ba = b.allocate(N * SIZE * 2, { name: 'alloc' });
  const br = b.register(Buffer.alloc(N * SIZE * 2), { name: 'reg' });
  const peer = a.loadPeer(b.metadata());
  // Every other 64 B slot, so nothing coalesces: 10,000 real descriptors.
  const offsets = Float64Array.from({ length: N }, (_, i) => i * SIZE * 2);
  const local = la.descriptors(offsets, SIZE);
  const direct = peer.region('alloc').descriptors(offsets, SIZE);
  const am = peer.region('reg').descriptors(offsets, SIZE);
  void ba;
  void br;

  const bench = new Bench({ time: Number(opt.time) });
  bench
    .add(`build DescriptorList (${N})`, () => {
      la.descriptors(offsets, SIZE);
    })
    .add(`WRITE ${N} x ${SIZE} B, direct (post -> settled in JS)`, async () => {
      await a.write(local, direct);
    })
    .add(`WRITE ${N} x ${SIZE} B, am packed`, async () => {
      await a.write(local, am);
    })
    .add(`READ ${N} x ${SIZE} B, am packed`, async () => {
      await a.read(local, am);
    })
    .add('WRITE 1 x 64 B, direct (per-transfer cost)', async () => {
      await a.write(la.descriptors([0], SIZE), peer.region('alloc').descriptors([0], SIZE));
    });
  await bench.run();
  const rows = bench.tasks.map((t) => {
    const median = t.result.latency.p50 * 1e6; // ms -> ns
    const per = t.name.includes(`${N}`) ? median / N : median;
    return { task: t.name, 'median µs': +(median / 1e3).toFixed(1), 'ns per descriptor': +per.toFixed(0), samples: t.result.latency.samplesCount ?? t.result.latency.samples?.length };
  });
  console.table(rows);
  await a.close();
  await b.close();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
