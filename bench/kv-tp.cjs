#!/usr/bin/env node
// Heterogeneous TP: what a decode rank's pull costs with HND blocks (one run per block and layer),
// NHD (one run per token), and NHD through the prefill's staging region (gather, one read, scatter;
// all timed end to end through KvReceiver.pull), on a realistic shape. Prefill TP 1 in another
// process, decode TP 2.
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

// One decode rank's pull through KvReceiver.pull, end to end (plan, read, done; with staging also
// the gather on the prefill, the control round trip and the scatter), against a KvSender in
// another process. The first pull warms the connection and is not counted.
async function run(blockLayout, stagingBytes) {
  const prefillSpec = { ...shape, blockLayout, blocks: 256, tp: { rank: 0, size: 1 } };
  const child = fork(path.join(__dirname, '..', 'test', 'fixtures', 'kv-sender.cjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  let nextId = 1;
  // Replies carry the request's id; the fixture's 'settled' events must not be taken for one.
  const call = (m) => new Promise((resolve) => {
    const id = nextId++;
    const onMessage = (reply) => {
      if (reply.id !== id) return;
      child.off('message', onMessage);
      resolve(reply);
    };
    child.on('message', onMessage);
    child.send({ id, ...m });
  });
  const { metadata } = await call({ cmd: 'init', name: 'prefill-0', layout: prefillSpec, transports: tls, fill: true, stagingBytes });
  const layout = new KvLayout({ ...shape, blockLayout, blocks: 256, tp: { rank: 0, size: 2 } });
  const agent = await Agent.create({ name: 'decode-0', ucx: { transports: tls } });
  const pool = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
  const receiver = new KvReceiver(agent, layout, pool);
  const peer = agent.loadPeer(Buffer.from(metadata, 'base64'));
  const n = Number(opt.blocks);
  const from = Array.from({ length: n }, (_, i) => 2 * i + 1); // scattered source blocks
  const to = Array.from({ length: n }, (_, i) => 3 * i); // scattered destination blocks
  const t0 = process.hrtime.bigint();
  const [plan] = layout.planPull(new KvLayout(prefillSpec), from, to);
  const planUs = Number(process.hrtime.bigint() - t0) / 1e3;
  const times = [];
  let r;
  for (let i = 0; i < Number(opt.runs) + 1; i++) {
    await call({ cmd: 'publish', req: `r${i}`, blocks: from, readers: 1, leaseMs: 60_000 });
    const start = process.hrtime.bigint();
    r = await receiver.pull({ requestId: `r${i}`, sources: [peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: from, destinationBlocks: to });
    if (i > 0) times.push(Number(process.hrtime.bigint() - start) / 1e3);
  }
  receiver.close();
  await agent.close();
  child.send({ cmd: 'exit' });
  const pullUs = median(times);
  return {
    blockLayout: blockLayout + (stagingBytes ? ' staged' : ''),
    'wire descriptors': r.stats[0].descriptors,
    'plan µs (unstaged)': +planUs.toFixed(0),
    path: r.stats[0].path,
    'pull µs (end to end)': +pullUs.toFixed(0),
    'GB/s': +(r.bytes / pullUs / 1e3).toFixed(2),
  };
}

(async () => {
  const rows = [await run('HND', 0), await run('NHD', 0), await run('NHD', 64 << 20)];
  console.log(`decode rank 0 of TP 2 pulls ${opt.blocks} blocks from prefill TP 1 (${opt.transport}), median of ${opt.runs}`);
  console.table(rows);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
