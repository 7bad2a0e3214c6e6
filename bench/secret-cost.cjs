#!/usr/bin/env node
// What `secret` costs on the data path: an agent with a secret runs without UCX's RMA feature (its
// software RMA would let any connected process write anywhere) and authenticates each connection
// once. Two agents in this process, registered memory, path 'am', 16 x 1 MiB per batch; per run the
// median of 7 batches, then the median over runs, with and without a secret interleaved.
//   node bench/secret-cost.cjs [--runs 5] [--transports shm,self|tcp]
'use strict';
const { Agent } = require('../dist');

const arg = (name, fallback) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : fallback);
const RUNS = Number(arg('--runs', 5));
const TRANSPORTS = arg('--transports', 'tcp');
const BLOCK = 1 << 20;
const BLOCKS = 16;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

(async () => {
  const results = {};
  for (let run = 0; run < RUNS; run++) {
    for (const secret of [undefined, 'bench-secret']) {
      const a = await Agent.create({ name: 'a', secret, ucx: { transports: TRANSPORTS } });
      const b = await Agent.create({ name: 'b', secret, ucx: { transports: TRANSPORTS } });
      const mine = a.register(Buffer.alloc(2 * BLOCKS * BLOCK, 1), { name: 'kv' });
      b.register(Buffer.alloc(2 * BLOCKS * BLOCK, 2), { name: 'kv' });
      const peer = a.loadPeer(b.metadata());
      const offsets = Array.from({ length: BLOCKS }, (_, i) => 2 * i * BLOCK); // not adjacent
      const local = mine.descriptors(offsets, BLOCK);
      const remote = peer.region('kv').descriptors(offsets, BLOCK);
      for (let i = 0; i < 3; i++) {
        await a.read(local, remote, { path: 'am' });
        await a.write(local, remote, { path: 'am' });
      }
      for (const op of ['read', 'write']) {
        const gbps = [];
        for (let i = 0; i < 7; i++) {
          const t0 = process.hrtime.bigint();
          await a[op](local, remote, { path: 'am' });
          gbps.push((BLOCKS * BLOCK) / Number(process.hrtime.bigint() - t0));
        }
        (results[`${op} ${secret ? 'with secret' : 'without'}`] ??= []).push(median(gbps));
      }
      await a.close();
      await b.close();
    }
  }
  console.log(`${TRANSPORTS}, ${BLOCKS} x ${BLOCK >> 20} MiB, path am, ${RUNS} runs (GB/s = 1e9 B/s)`);
  for (const [k, v] of Object.entries(results))
    console.log(`  ${k.padEnd(20)} median ${median(v).toFixed(2)} GB/s   runs ${v.map((x) => x.toFixed(2)).join(' ')}`);
})();
