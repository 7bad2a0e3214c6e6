#!/usr/bin/env node
// How long until pending transfers learn their peer died, and what an idle agent costs.
//   node bench/lifecycle.cjs [--runs 3] [--idle-seconds 5]
'use strict';
const { fork } = require('node:child_process');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { Agent } = require('../dist');

const { values: opt } = parseArgs({
  options: { runs: { type: 'string', default: '3' }, 'idle-seconds': { type: 'string', default: '5' } },
});
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function startTarget(name, transports) {
  const child = fork(path.join(__dirname, '..', 'test', 'fixtures', 'peer.cjs'), [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  return new Promise((resolve) => {
    child.once('message', (m) => resolve({ child, metadata: Buffer.from(m.metadata, 'base64') }));
    child.send({ id: 1, cmd: 'init', name, transports, memory: 'registered', size: 4 << 20 });
  });
}

async function deathDetection(transports, run) {
  const agent = await Agent.create({ name: `watch-${run}`, ucx: { transports } });
  const local = agent.register(Buffer.alloc(4 << 20), { name: 'l' });
  const { child, metadata } = await startTarget(`dying-${run}`, transports);
  const peer = agent.loadPeer(metadata);
  const l = local.descriptors([0], [1 << 20]);
  const r = peer.region('kv').descriptors([0], [1 << 20]);
  await agent.write(l, r);
  process.kill(child.pid, 'SIGSTOP');
  const pending = Array.from({ length: 8 }, () => agent.write(l, r).catch((e) => e.code));
  await new Promise((res) => setTimeout(res, 50));
  const t0 = Date.now();
  child.kill('SIGKILL');
  const codes = await Promise.all(pending);
  const ms = Date.now() - t0;
  await agent.close();
  return { ms, codes: [...new Set(codes)] };
}

function cpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function idleCpu(progress) {
  const a = await Agent.create({ name: `idle-${progress}`, progress });
  const b = await Agent.create({ name: `idle-peer-${progress}` });
  b.register(Buffer.alloc(4096), { name: 'kv' });
  const local = a.register(Buffer.alloc(4096), { name: 'l' });
  const peer = a.loadPeer(b.metadata());
  await a.write(local.descriptors([0], 4096), peer.region('kv').descriptors([0], 4096)); // connected
  const seconds = Number(opt['idle-seconds']);
  const c0 = cpuSeconds();
  await new Promise((res) => setTimeout(res, seconds * 1000));
  const used = cpuSeconds() - c0;
  await a.close();
  await b.close();
  return { percentOfOneCore: +((100 * used) / seconds).toFixed(2) };
}

(async () => {
  const out = {};
  for (const [label, tls] of [['shm', 'shm,self'], ['tcp', 'tcp']]) {
    const runs = [];
    for (let i = 0; i < Number(opt.runs); i++) runs.push(await deathDetection(tls, `${label}-${i}`));
    out[`peer death -> ERR_REMOTE_DISCONNECT (${label})`] = { medianMs: median(runs.map((r) => r.ms)), runsMs: runs.map((r) => r.ms), codes: runs[0].codes };
  }
  out['idle agent + connected peer, event mode'] = await idleCpu('event');
  out['idle agent + connected peer, poll mode'] = await idleCpu('poll');
  console.log(JSON.stringify(out, null, 1));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
