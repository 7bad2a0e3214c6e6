#!/usr/bin/env node
// A survivor whose shared-memory peers are SIGKILLed mid-batch, watched by a healthy long-lived
// witness peer that writes to it (with a notification) after every kill. Shows UCX's shm FIFO being
// blocked by a sender killed mid-write (the witness's messages stop arriving), and kvwire's recovery:
// the survivor opens a new UCX worker ('rebuilt'), the witness loads its new metadata, and is served.
//   node bench/shm-queue-block.cjs [--rounds 20]
'use strict';
const { fork } = require('node:child_process');
const path = require('node:path');
const { Agent } = require('../dist');

const ROUNDS = Number(process.argv[process.argv.indexOf('--rounds') + 1]) || 20;
const FIXTURE = path.join(__dirname, '..', 'test', 'fixtures', 'peer.cjs');

// A kvwire agent in a child process, driven over IPC (test/fixtures/peer.cjs).
function child() {
  const c = fork(FIXTURE, [], { stdio: ['ignore', 'ignore', 'ignore', 'ipc'], env: { ...process.env, NODE_OPTIONS: '--disable-warning=KVWIRE_NO_SECRET' } });
  let next = 0;
  const pending = new Map();
  c.on('message', (m) => pending.get(m.id)?.(m));
  c.call = (cmd, args = {}) => new Promise((resolve) => { pending.set(++next, resolve); c.send({ id: next, cmd, ...args }); });
  return c;
}

(async () => {
  const survivor = await Agent.create({ name: 'S', ucx: { transports: 'shm,self' } });
  const mine = survivor.register(Buffer.alloc(16 << 20), { name: 'kv' });
  let notifications = 0;
  let rebuilt = false;
  survivor.on('notification', () => notifications++);
  survivor.on('rebuilt', ({ reason }) => { rebuilt = true; console.log(`  rebuilt: ${reason}`); });
  const witness = child();
  await witness.call('init', { name: 'W', transports: 'shm,self', memory: 'registered', size: 1 << 20 });
  await witness.call('load', { metadata: Buffer.from(survivor.metadata()).toString('base64') });
  for (let round = 1; round <= ROUNDS; round++) {
    const victim = child();
    const v = await victim.call('init', { name: `T${round}`, transports: 'shm,self', memory: 'registered', size: 16 << 20 });
    const peer = survivor.loadPeer(Buffer.from(v.metadata, 'base64'));
    let lastError = '';
    const jobs = Array.from({ length: 12 }, (_, k) => {
      const size = k % 3 === 0 ? 64 << 10 : 1 << 20;
      const local = mine.descriptors([k << 20], [size]);
      const remote = peer.region('kv').descriptors([k << 20], [size]);
      return (k % 2 ? survivor.read(local, remote) : survivor.write(local, remote)).then(
        () => 'ok',
        (e) => { lastError = e.message; return e.code; },
      );
    });
    await new Promise((r) => setTimeout(r, round % 4)); // kill at different points of the batch
    process.kill(v.pid, 'SIGKILL');
    const outcomes = await Promise.all(jobs);
    survivor.forgetPeer(peer.name);
    if (rebuilt) { // the survivor's address changed: the witness loads its new metadata
      await witness.call('load', { metadata: Buffer.from(survivor.metadata()).toString('base64') });
      rebuilt = false;
    }
    const before = notifications;
    const w = await witness.call('transfer', { op: 'write', peer: 'S', localOffsets: [0], remoteOffsets: [0], lengths: [4096], notify: `r${round}`, deadlineMs: 4000 });
    await new Promise((r) => setTimeout(r, 200));
    const counts = outcomes.reduce((m, o) => ((m[o] = (m[o] || 0) + 1), m), {});
    console.log(`round ${round}: survivor ${JSON.stringify(survivor.health)}, its transfers ${JSON.stringify(counts)}; ` +
      `witness write ${w.ok ? 'ok' : w.error.code}, its notification ${notifications > before ? 'arrived' : 'did not arrive'}`);
    if (!outcomes.includes('ok')) console.log(`    ${lastError}`);
  }
  witness.kill('SIGKILL');
  process.exit(0);
})();
