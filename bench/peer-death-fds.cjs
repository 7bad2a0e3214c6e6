// What an agent keeps after peers die mid-transfer: 40 rounds of a shm peer SIGKILLed while 12 READs and
// WRITEs (64 KiB and 1 MiB) are in flight, then close. Prints the UCX worker rebuilds, the file
// descriptors and RSS the agent gained, and the descriptors left after close (0 or less: nothing kept).
//   node bench/peer-death-fds.cjs      (KVWIRE_ADDON=... to measure another build)
const { fork } = require('node:child_process');
const fs = require('node:fs');
const { Agent } = require('../dist');
const start = (name) => new Promise((res, rej) => {
  const child = fork(require('node:path').join(__dirname, '..', 'test', 'fixtures', 'peer.cjs'), [], { stdio: ['ignore', 'ignore', 'ignore', 'ipc'] });
  child.once('message', (m) => (m.ok ? res({ child, metadata: Buffer.from(m.metadata, 'base64') }) : rej(new Error(JSON.stringify(m)))));
  child.send({ id: 1, cmd: 'init', name, transports: 'shm,self', memory: 'registered', size: 16 << 20 });
});
(async () => {
  const agent = await Agent.create({ name: 'leak', ucx: { transports: 'shm,self' } });
  const local = agent.register(Buffer.alloc(16 << 20), { name: 'l' });
  const fds = () => fs.readdirSync('/proc/self/fd').length;
  const f0 = fds(), r0 = process.memoryUsage().rss;
  for (let round = 0; round < 40; round++) {
    const { child, metadata } = await start('d' + round);
    const peer = agent.loadPeer(metadata);
    const ts = Array.from({ length: 12 }, (_, i) => { const s = i % 3 === 0 ? 64 << 10 : 1 << 20; const l = local.descriptors([i << 20], [s]); const r = peer.region('kv').descriptors([i << 20], [s]); return (i % 2 ? agent.read(l, r) : agent.write(l, r)).catch(() => {}); });
    await new Promise((r) => setTimeout(r, round % 4));
    child.kill('SIGKILL');
    await Promise.all(ts);
    agent.forgetPeer(peer);
  }
  await new Promise((r) => setTimeout(r, 1500));
  console.log(`rebuilds ${agent.health.rebuilds}, fds +${fds() - f0}, RSS +${((process.memoryUsage().rss - r0) / 2 ** 20).toFixed(1)} MiB`);
  await agent.close();
  console.log(`after close: fds +${fds() - f0}`);
})();
