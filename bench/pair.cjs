#!/usr/bin/env node
// Two processes, one kvwire transfer path: WRITE and READ of `batch` blocks of `block` bytes,
// median GB/s over several runs, and ucx_perftest on the same transport and size in the same
// script as the baseline. Usage:
//   node bench/pair.cjs [--transport shm|tcp] [--block 1048576] [--batch 64] [--runs 5] [--iters 10]
//                       [--layout spread|hot] [--progress event|poll] [--json]
'use strict';
const { fork, spawn, execFileSync } = require('node:child_process');
const { parseArgs } = require('node:util');
const { Agent } = require('../dist');

const { values: opt } = parseArgs({
  options: {
    transport: { type: 'string', default: 'shm' },
    block: { type: 'string', default: String(1 << 20) },
    batch: { type: 'string', default: '64' },
    runs: { type: 'string', default: '5' },
    iters: { type: 'string', default: '10' },
    layout: { type: 'string', default: 'spread' },
    json: { type: 'boolean', default: false },
    role: { type: 'string', default: 'initiator' },
    memory: { type: 'string', default: 'allocated' },
    progress: { type: 'string', default: 'event' },
  },
});
const tls = opt.transport === 'tcp' ? 'tcp' : 'shm,self';
const block = Number(opt.block);
const batch = Number(opt.batch);
const slots = opt.layout === 'hot' ? 1 : batch * 2; // spread: blocks scattered over twice the batch
const regionBytes = block * slots;

function makeRegion(agent, memory) {
  if (memory === 'allocated') return agent.allocate(regionBytes, { name: 'kv' });
  const buf = Buffer.alloc(regionBytes);
  for (let i = 0; i < regionBytes; i += 4096) buf[i] = i & 0xff; // fault pages in, real data
  return agent.register(buf, { name: 'kv' });
}

if (opt.role === 'target') {
  process.once('message', async (m) => {
    const agent = await Agent.create({ name: `target-${m.memory}`, progress: opt.progress, ucx: { transports: tls } });
    makeRegion(agent, m.memory);
    process.send({ metadata: Buffer.from(agent.metadata()).toString('base64') });
    process.on('message', async () => {
      await agent.close();
      process.exit(0);
    });
  });
  return;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function perm(n, seed) {
  const a = Array.from({ length: n }, (_, i) => i);
  let x = seed;
  for (let i = n - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) >>> 0;
    const j = x % (i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

async function measure(memory) {
  const child = fork(__filename, ['--role', 'target', '--transport', opt.transport, '--block', opt.block, '--batch', opt.batch,
    '--layout', opt.layout, '--progress', opt.progress], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  child.send({ memory });
  const { metadata } = await new Promise((r) => child.once('message', r));
  const agent = await Agent.create({ name: `init-${memory}`, progress: opt.progress, ucx: { transports: tls } });
  const region = makeRegion(agent, memory);
  const kv = agent.loadPeer(Buffer.from(metadata, 'base64')).region('kv');
  // Distinct, non-adjacent blocks on both sides (no coalescing): the realistic KV pattern.
  const localSlots = opt.layout === 'hot' ? Array(batch).fill(0) : perm(slots, 1).slice(0, batch);
  const remoteSlots = opt.layout === 'hot' ? Array(batch).fill(0) : perm(slots, 2).slice(0, batch);
  const local = region.descriptors(localSlots.map((s) => s * block), block);
  const remote = kv.descriptors(remoteSlots.map((s) => s * block), block);
  const out = { memory };
  for (const op of ['write', 'read']) {
    const go = () => (op === 'write' ? agent.write(local, remote) : agent.read(local, remote));
    for (let i = 0; i < 3; i++) await go(); // warm-up
    const rates = [];
    let path = '';
    const lat = [];
    for (let r = 0; r < Number(opt.runs); r++) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < Number(opt.iters); i++) {
        const s = await go();
        path = s.path;
        lat.push(s.transferUs);
      }
      const sec = Number(process.hrtime.bigint() - t0) / 1e9;
      rates.push((block * batch * Number(opt.iters)) / sec / 1e9);
    }
    out[op] = { gbps: median(rates), runs: rates.map((x) => +x.toFixed(2)), path, p50Us: median(lat) };
  }
  child.send('exit');
  await agent.close();
  await new Promise((r) => child.once('exit', r));
  return out;
}

// ucx_perftest between two processes on the same transport; GB/s (1e9), median of `runs`.
function perftest(test, env) {
  try {
    execFileSync('ucx_perftest', ['-h'], { stdio: 'ignore' });
  } catch (e) {
    if (e.code === 'ENOENT') return { skipped: 'ucx_perftest not installed (apt-get install ucx-utils)' };
  }
  const rates = [];
  for (let r = 0; r < Number(opt.runs); r++) {
    const port = 20000 + Math.floor(Math.random() * 20000);
    const fullEnv = { ...process.env, UCX_TLS: tls, ...env };
    const server = spawn('ucx_perftest', ['-p', String(port)], { env: fullEnv, stdio: 'ignore' });
    execFileSync('sleep', ['0.3']);
    // Enough iterations for ~64 MiB, but bounded: emulated get over tcp costs ~1 ms per message.
    const iterations = Math.max(100, Math.min(10_000, Math.floor((64 << 20) / block)));
    let text;
    try {
      text = execFileSync('ucx_perftest', ['127.0.0.1', '-p', String(port), '-t', test, '-s', String(block),
        '-n', String(iterations), '-w', '20'], { env: fullEnv, encoding: 'utf8', timeout: 60_000 });
    } catch (e) {
      server.kill();
      return { skipped: `ucx_perftest ${test} did not finish: ${e.code || e.signal || e.message}` };
    }
    server.kill();
    const final = text.split('\n').find((l) => l.startsWith('Final:'));
    const cols = final.trim().split(/\s+/);
    rates.push((Number(cols[6]) * 1024 * 1024) / 1e9); // overall bandwidth column, MB/s (2^20)
  }
  return { gbps: median(rates), runs: rates.map((x) => +x.toFixed(2)) };
}

// Single-thread memcpy of the same blocks between two buffers of this process: the ceiling for a
// one-copy path with this layout.
function memcpyCeiling() {
  const src = Buffer.alloc(regionBytes, 1);
  const dst = Buffer.alloc(regionBytes, 2);
  const from = opt.layout === 'hot' ? Array(batch).fill(0) : perm(slots, 1).slice(0, batch);
  const to = opt.layout === 'hot' ? Array(batch).fill(0) : perm(slots, 2).slice(0, batch);
  const rates = [];
  for (let r = 0; r < Number(opt.runs); r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < Number(opt.iters); i++)
      for (let k = 0; k < batch; k++) src.copy(dst, to[k] * block, from[k] * block, from[k] * block + block);
    rates.push((block * batch * Number(opt.iters)) / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e9);
  }
  return { gbps: median(rates), runs: rates.map((x) => +x.toFixed(2)) };
}

(async () => {
  const rows = [];
  for (const memory of ['allocated', 'registered']) rows.push(await measure(memory));
  const base = {
    put: perftest('ucp_put_bw', {}),
    get: perftest('ucp_get', {}),
    tag: perftest('tag_bw', { UCX_ALLOC_PRIO: 'heap' }),
    memcpy: memcpyCeiling(),
  };
  const result = { transport: opt.transport, block, batch, layout: opt.layout, runs: Number(opt.runs), rows, baseline: base };
  if (opt.json) {
    console.log(JSON.stringify(result));
    return;
  }
  const ratio = (x, b) => (b && b.gbps ? `${((100 * x) / b.gbps).toFixed(0)}%` : 'n/a');
  console.log(`kvwire pair bench: ${opt.transport}, ${batch} x ${block} B blocks (${opt.layout}), median of ${opt.runs} runs x ${opt.iters} batches`);
  const table = {};
  for (const r of rows) {
    table[`${r.memory} WRITE`] = { path: r.write.path, 'GB/s': +r.write.gbps.toFixed(2), 'batch p50 µs': +r.write.p50Us.toFixed(0), 'vs put_bw': ratio(r.write.gbps, base.put), 'vs tag_bw': ratio(r.write.gbps, base.tag), 'vs memcpy': ratio(r.write.gbps, base.memcpy) };
    table[`${r.memory} READ`] = { path: r.read.path, 'GB/s': +r.read.gbps.toFixed(2), 'batch p50 µs': +r.read.p50Us.toFixed(0), 'vs get': ratio(r.read.gbps, base.get), 'vs tag_bw': ratio(r.read.gbps, base.tag), 'vs memcpy': ratio(r.read.gbps, base.memcpy) };
  }
  console.table(table);
  console.log('baselines (ucx_perftest, same transport and size):', JSON.stringify(base));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
