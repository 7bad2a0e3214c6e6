// An agent whose shared-memory receive queue is blocked (a peer died writing into it) opens a new UCX
// worker. That happens only after the right kill lands (test/peer-death-soak.test.ts sees it
// happen); here the same path is taken on demand, so what follows a rebuild is checked every run:
// what was in flight fails saying why, loaded peers reconnect by themselves, an agent that had
// loaded the rebuilt one is told at once, and works again once it loads the new metadata.
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent, type Rebuilt } from '../lib';
import { PeerProcess, stopProcess } from './helpers';

const cleanup: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

for (const transports of ['shm,self', 'tcp']) {
  describe(`a new UCX worker (${transports})`, () => {
    it('fails what was in flight, reconnects loaded peers, tells the peers that loaded it, and serves them after they reload', async () => {
      const mover = await Agent.create({ name: 'mover', ucx: { transports } });
      cleanup.push(() => mover.close());
      const mine = mover.register(Buffer.alloc(1 << 20, 0x5a), { name: 'kv' });
      const stayer = new PeerProcess('stayer');
      cleanup.push(() => stayer.close());
      const s = await stayer.init({ transports, memory: 'registered', size: 1 << 20 });
      const peer = mover.loadPeer(Buffer.from(s.metadata, 'base64'));
      await stayer.ok('load', { metadata: Buffer.from(mover.metadata()).toString('base64') });
      await mover.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]));
      await stayer.ok('transfer', { op: 'write', peer: 'mover', localOffsets: [0], remoteOffsets: [8192], lengths: [4096] });
      const events: Rebuilt[] = [];
      mover.on('rebuilt', (r) => events.push(r));
      const before = Buffer.from(mover.metadata());

      // A READ the stayer cannot answer (stopped) is in flight when the worker is replaced.
      stopProcess(s.pid);
      let err: any;
      try {
        const pending = mover.read(mine.descriptors([65536], [4096]), peer.region('kv').descriptors([0], [4096]));
        await new Promise((r) => setTimeout(r, 50));
        mover._rebuildTransportForTest();
        err = await pending.then(() => null, (e) => e);
      } finally {
        process.kill(s.pid, 'SIGCONT');
      }
      expect(err?.code).toBe('ERR_REMOTE_DISCONNECT');
      expect(err.message).toMatch(/opened a new UCX worker/);
      await new Promise((r) => setTimeout(r, 50));
      expect(events).toHaveLength(1);
      expect(mover.health).toEqual({ receiveBlocked: false, rebuilds: 1, retiredRegions: 0, gpuKernelBatches: 0, vramStagedBytes: 0, progressThreadSteps: expect.any(Number), gpuFault: null });
      const after = Buffer.from(mover.metadata());
      expect(after.equals(before)).toBe(false); // a new address (and generation)

      // The mover's own loaded peer was connected again by itself.
      mine.bytes.fill(0x6b, 0, 4096);
      await mover.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([16384], [4096]));
      const theirs = await stayer.ok('hash', { offsets: [16384], lengths: [4096] });
      expect(theirs.hash).toBe(createHash('sha256').update(mine.bytes.subarray(0, 4096)).digest('hex'));

      // The stayer had loaded the mover: told at once (the old worker said it moved), not after a probe.
      const started = Date.now();
      const refused = await stayer.call('transfer', { op: 'write', peer: 'mover', localOffsets: [0], remoteOffsets: [8192], lengths: [4096], deadlineMs: 10_000 });
      expect(refused.ok).toBe(false);
      expect(refused.error).toMatchObject({ code: 'ERR_REMOTE_DISCONNECT', message: expect.stringMatching(/moved to a new UCX worker/) });
      expect(Date.now() - started).toBeLessThan(1000);

      // Once it loads the new metadata, it is served, notifications included.
      let note: { from: string; message: Buffer } | undefined;
      mover.on('notification', (n) => (note = n));
      await stayer.ok('load', { metadata: after.toString('base64') });
      await stayer.ok('transfer', { op: 'write', peer: 'mover', localOffsets: [0], remoteOffsets: [8192], lengths: [4096], notify: 'back' });
      await new Promise((r) => setTimeout(r, 50));
      expect(note?.from).toBe('stayer');
      expect(note?.message.toString()).toBe('back');
      const landed = await stayer.ok('hash', { offsets: [0], lengths: [4096] });
      expect(landed.hash).toBe(createHash('sha256').update(mine.bytes.subarray(8192, 12288)).digest('hex'));
    });
  });
}
