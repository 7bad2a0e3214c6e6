#!/usr/bin/env node
// What the native progress thread buys when the target's JS thread is busy with the application:
// an initiator moves batches by active messages (path 'am', registered memory) to a target process
// whose event loop is kept busy `--busy B/E` (B ms of synchronous JS out of every E ms), with the
// progress thread on and off, interleaved per run (both ends get the same setting). Per cell: GB/s
// quiet and busy (bytes over each 1 s period, then the median over runs) and what share of its
// quiet rate the busy target kept.
//   node bench/busy-js.cjs [--runs 5] [--transports tcp|shm,self] [--block 1M] [--count 16] [--busy 8/10] [--seconds 1]
'use strict';
const { fork } = require('node:child_process');
const { Agent } = require('../dist');

const arg = (name, fallback) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : fallback);
const size = (s) => Number(String(s).replace(/[KM]$/i, '')) * ({ k: 1024, m: 1 << 20 }[String(s).slice(-1).toLowerCase()] ?? 1);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

if (process.argv[2] === '--target') {
  // The target: an agent, a registered pool, and on request a busy event loop.
  let agent;
  let timer;
  process.on('message', async (m) => {
    if (m.cmd === 'init') {
      agent = await Agent.create({ name: 'busy-target', progressThread: m.progressThread, ucx: { transports: m.transports }, cma: false });
      agent.register(Buffer.alloc(m.bytes, 2), { name: 'kv' });
      process.send({ metadata: Buffer.from(agent.metadata()).toString('base64') });
    } else if (m.cmd === 'busy') {
      clearInterval(timer);
      if (m.busyMs > 0)
        timer = setInterval(() => {
          const t0 = Date.now();
          while (Date.now() - t0 < m.busyMs);
        }, m.everyMs);
      process.send({});
    } else if (m.cmd === 'close') {
      clearInterval(timer);
      const steps = agent.health.progressThreadSteps;
      await agent.close();
      process.send({ steps });
      process.exit(0);
    }
  });
  return;
}

const RUNS = Number(arg('--runs', 5));
const TRANSPORTS = arg('--transports', 'tcp');
const BLOCK = size(arg('--block', '1M'));
const COUNT = Number(arg('--count', 16));
const [BUSY, EVERY] = arg('--busy', '8/10').split('/').map(Number);
const SECONDS = Number(arg('--seconds', 1));

function ask(child, m) {
  return new Promise((resolve) => {
    child.once('message', resolve);
    child.send(m);
  });
}

// Bytes over time across the whole period (not a median of batches: batches that fall between two
// busy spells would hide the ones that waited through one).
async function rate(a, op, local, remote) {
  const t0 = process.hrtime.bigint();
  const end = Date.now() + SECONDS * 1000;
  let batches = 0;
  while (Date.now() < end || batches < 3) {
    await a[op](local, remote, { path: 'am' });
    batches++;
  }
  return (batches * COUNT * BLOCK) / Number(process.hrtime.bigint() - t0);
}

(async () => {
  const results = {};
  const steps = { on: [], off: [] };
  for (let run = 0; run < RUNS; run++) {
    for (const thread of run % 2 ? ['off', 'on'] : ['on', 'off']) {
      const progressThread = thread === 'on';
      const child = fork(__filename, ['--target'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      const bytes = 2 * COUNT * BLOCK;
      const { metadata } = await ask(child, { cmd: 'init', progressThread, transports: TRANSPORTS, bytes });
      const a = await Agent.create({ name: 'busy-init', progressThread, ucx: { transports: TRANSPORTS }, cma: false });
      const mine = a.register(Buffer.alloc(bytes, 1), { name: 'kv' });
      const peer = a.loadPeer(Buffer.from(metadata, 'base64'));
      const offsets = Array.from({ length: COUNT }, (_, i) => 2 * i * BLOCK); // not adjacent
      const local = mine.descriptors(offsets, BLOCK);
      const remote = peer.region('kv').descriptors(offsets, BLOCK);
      for (let i = 0; i < 3; i++) await a.write(local, remote, { path: 'am' }); // connected, warm
      for (const op of ['write', 'read']) {
        await ask(child, { cmd: 'busy', busyMs: 0 });
        const quiet = await rate(a, op, local, remote);
        await ask(child, { cmd: 'busy', busyMs: BUSY, everyMs: EVERY });
        const busy = await rate(a, op, local, remote);
        const key = `${op} thread ${thread}`;
        (results[key] ??= { quiet: [], busy: [], kept: [] }).quiet.push(quiet);
        results[key].busy.push(busy);
        results[key].kept.push(busy / quiet);
        process.stderr.write(`run ${run + 1}/${RUNS} ${key}: quiet ${quiet.toFixed(2)} GB/s, busy ${busy.toFixed(2)} GB/s (${((100 * busy) / quiet).toFixed(0)}%)\n`);
      }
      steps[thread].push((await ask(child, { cmd: 'close' })).steps);
      await a.close();
    }
  }
  console.log(`${TRANSPORTS}, ${COUNT} x ${BLOCK >= 1 << 20 ? `${BLOCK >> 20} MiB` : `${BLOCK >> 10} KiB`}, path am, registered, ` +
    `target JS busy ${BUSY} ms of every ${EVERY} ms, ${RUNS} runs, medians (GB/s = 1e9 B/s)`);
  for (const [k, v] of Object.entries(results))
    console.log(`  ${k.padEnd(16)} quiet ${median(v.quiet).toFixed(2)}  busy ${median(v.busy).toFixed(2)}  kept ${(100 * median(v.kept)).toFixed(0)}%` +
      `   (kept per run: ${v.kept.map((x) => `${(100 * x).toFixed(0)}%`).join(' ')})`);
  console.log(`  target's progress-thread steps per run: on ${steps.on.join(' ')}; off ${steps.off.join(' ')}`);
})();
