#!/usr/bin/env node
// Heterogeneous TP: what a decode rank's pull costs with HND blocks (one run per block and layer),
// NHD (one run per token), and NHD through the prefill's staging region (gather, one read, scatter;
// timed end to end), on a realistic shape. Prefill TP 1 in another process, decode TP 2.
//   node bench/kv-tp.cjs [--transport shm|tcp] [--blocks 16] [--runs 5]
'use strict';
const { fork } = require('node:child_process');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { Agent, KvLayout, KvReceiver } = require('../dist');

const { values: opt } = parseArgs({
  options: { transport: { type: 'string', default: 'shm' }, blocks: { type: 'string', default: '16' }, runs: { type: 'string', default: '5' } },
});
const tls = opt.transport === 'tcp' ? 'tcp' : 'shm,self';
const shape = { modelId: 'llama-8b', layers: 32, tokensPerBlock: 16, kvHeads: 8, headDim: 128, dtypeBytes: 2 };
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function run(blockLayout) {
  const prefillSpec = { ...shape, blockLayout, blocks: 256, tp: { rank: 0, size: 1 } };
  const child = fork(path.join(__dirname, '..', 'test', 'fixtures', 'kv-prefill.cjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  child.send({ layout: prefillSpec, transports: tls });
  const { metadata } = await new Promise((r) => child.once('message', r));
  const layout = new KvLayout({ ...shape, blockLayout, blocks: 256, tp: { rank: 0, size: 2 } });
  const agent = await Agent.create({ name: 'decode-0', ucx: { transports: tls } });
  const pool = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
  const peer = agent.loadPeer(Buffer.from(metadata, 'base64'));
  const n = Number(opt.blocks);
  const from = Array.from({ length: n }, (_, i) => 2 * i + 1); // scattered source blocks
  const to = Array.from({ length: n }, (_, i) => 3 * i); // scattered destination blocks
  const t0 = process.hrtime.bigint();
  const [plan] = layout.planPull(new KvLayout(prefillSpec), from, to);
  const planUs = Number(process.hrtime.bigint() - t0) / 1e3;
  const times = [];
  let stats;
  for (let r = 0; r < Number(opt.runs) + 1; r++) {
    stats = await agent.read(pool.descriptors(plan.destinationOffsets, plan.lengths), peer.region('kv').descriptors(plan.sourceOffsets, plan.lengths));
    if (r > 0) times.push(stats.transferUs); // first run warms the connection
  }
  await agent.close();
  child.send('exit');
  return { blockLayout, descriptors: plan.lengths.length, segments: stats.segments, bytes: plan.bytes, path: stats.path, planUs: +planUs.toFixed(0), transferUsMedian: +median(times).toFixed(0), gbps: +(plan.bytes / median(times) / 1e3).toFixed(2) };
}

// NHD through the sender's staging region: the prefill gathers decode rank 0's heads into one run.
async function runStaged() {
  const prefillSpec = { ...shape, blockLayout: 'NHD', blocks: 256, tp: { rank: 0, size: 1 } };
  const child = fork(path.join(__dirname, '..', 'test', 'fixtures', 'kv-sender.cjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const call = (m) => new Promise((r) => { child.once('message', r); child.send({ id: 1, ...m }); });
  const { metadata } = await call({ cmd: 'init', name: 'prefill-0', layout: prefillSpec, transports: tls, fill: true, stagingBytes: 64 << 20 });
  const layout = new KvLayout({ ...shape, blockLayout: 'NHD', blocks: 256, tp: { rank: 0, size: 2 } });
  const agent = await Agent.create({ name: 'decode-0', ucx: { transports: tls } });
  const pool = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
  const receiver = new KvReceiver(agent, layout, pool);
  const peer = agent.loadPeer(Buffer.from(metadata, 'base64'));
  const n = Number(opt.blocks);
  const from = Array.from({ length: n }, (_, i) => 2 * i + 1);
  const to = Array.from({ length: n }, (_, i) => 3 * i);
  const times = [];
  let r;
  for (let i = 0; i < Number(opt.runs) + 1; i++) {
    await call({ cmd: 'publish', req: `r${i}`, blocks: from, readers: 1, leaseMs: 60_000 });
    const t0 = process.hrtime.bigint();
    r = await receiver.pull({ requestId: `r${i}`, sources: [peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: from, destinationBlocks: to });
    if (i > 0) times.push(Number(process.hrtime.bigint() - t0) / 1e3); // gather + read + scatter, end to end
  }
  await agent.close();
  child.send({ cmd: 'exit' });
  return { blockLayout: 'NHD staged', descriptors: 1, segments: r.stats[0].segments, bytes: r.bytes, path: r.stats[0].path, planUs: 0, transferUsMedian: +median(times).toFixed(0), gbps: +(r.bytes / median(times) / 1e3).toFixed(2) };
}

(async () => {
  const rows = [await run('HND'), await run('NHD'), await runStaged()];
  console.log(`decode rank 0 of TP 2 pulls ${opt.blocks} blocks from prefill TP 1 (${opt.transport}), median of ${opt.runs}`);
  console.table(rows);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
