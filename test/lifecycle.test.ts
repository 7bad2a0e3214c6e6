// Completion guarantees: deadlines, cancel, abort, close, a peer killed mid-transfer; notifications;
// GC pinning; agents inside worker_threads.
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvwireError, type Region } from '../lib';
import { PeerProcess, stopProcess } from './helpers';

const fixture = (name: string) => path.join(__dirname, 'fixtures', name);

for (const { label, transports } of [
  { label: 'shm', transports: 'shm,self' },
  { label: 'tcp', transports: 'tcp' },
]) {
  describe(`settlement against a real peer process (${label})`, () => {
    let agent: Agent;
    let local: Region;
    let target: PeerProcess;
    beforeAll(async () => {
      agent = await Agent.create({ name: `life-${label}`, ucx: { transports } });
      local = agent.register(Buffer.alloc(8 << 20), { name: 'local' });
    });
    afterAll(async () => {
      await agent.close();
    });

    async function freshTarget(name: string) {
      target = new PeerProcess(name);
      // Active messages: the target must take part (a stopped target does not stall path 'cma',
      // which copies without it: test/cma.test.ts).
      await target.init({ transports, memory: 'registered', size: 8 << 20, cma: false });
      return agent.loadPeer(Buffer.from(target.metadata, 'base64'));
    }

    it('deadline, cancel and abort each settle a stalled transfer with their code', async () => {
      const peer = await freshTarget(`stall-${label}`);
      const remote = peer.region('kv').descriptors([0], [4 << 20]);
      const l = local.descriptors([0], [4 << 20]);
      await agent.write(l, remote); // connection is up
      stopProcess(target.child.pid!); // the target stops answering
      try {
        const t0 = Date.now();
        const timedOut = agent.write(l, remote, { deadlineMs: 300 });
        await expect(timedOut).rejects.toMatchObject({ code: 'ERR_TIMEOUT' });
        expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
        expect(timedOut.status).toBe('failed');

        const canceled = agent.read(l, remote);
        expect(canceled.status).toBe('pending');
        setTimeout(() => canceled.cancel(), 50);
        await expect(canceled).rejects.toMatchObject({ code: 'ERR_CANCELED' });
        expect(canceled.cancel()).toBe(false); // settles once

        const ac = new AbortController();
        const aborted = agent.write(l, remote, { signal: ac.signal });
        setTimeout(() => ac.abort(), 50);
        await expect(aborted).rejects.toMatchObject({ code: 'ERR_CANCELED' });

        const pre = new AbortController();
        pre.abort();
        await expect(agent.write(l, remote, { signal: pre.signal })).rejects.toMatchObject({ code: 'ERR_CANCELED' });

        // onComplete sees the same outcome, exactly once.
        const calls: (string | null)[] = [];
        const t = agent.write(l, remote, { deadlineMs: 100, onComplete: (e) => calls.push(e ? e.code : null) });
        await t.catch(() => {});
        expect(calls).toEqual(['ERR_TIMEOUT']);
      } finally {
        process.kill(target.child.pid!, 'SIGCONT');
      }
      // After the stall the connection still works.
      const stats = await agent.write(l, remote, { deadlineMs: 10_000 });
      expect(stats.bytes).toBe(4 << 20);
      agent.forgetPeer(peer);
      await target.close();
    });

    it('a peer killed mid-transfer rejects every pending transfer with ERR_REMOTE_DISCONNECT', async () => {
      const peer = await freshTarget(`victim-${label}`);
      const remote = peer.region('kv').descriptors([0], [2 << 20]);
      const l = local.descriptors([0], [2 << 20]);
      await agent.write(l, remote);
      stopProcess(target.child.pid!); // freeze it so transfers are surely in flight
      const pending = Array.from({ length: 20 }, (_, i) => (i % 2 ? agent.read(l, remote) : agent.write(l, remote)));
      await new Promise((r) => setTimeout(r, 100));
      expect(pending.every((t) => t.status === 'pending')).toBe(true);
      const killedAt = Date.now();
      target.kill();
      const outcomes = await Promise.all(pending.map((t) => t.then(() => 'ok', (e: KvwireError) => e.code)));
      const elapsed = Date.now() - killedAt;
      expect(outcomes).toEqual(Array(20).fill('ERR_REMOTE_DISCONNECT'));
      expect(elapsed).toBeLessThan(8000);
      // New transfers to the dead peer fail at once, with the same code.
      await expect(agent.write(l, remote)).rejects.toMatchObject({ code: 'ERR_REMOTE_DISCONNECT' });
      agent.forgetPeer(peer);
    }, 30_000);

    it('loading a restarted peer of the same name fails transfers to the old instance cleanly', async () => {
      const oldPeer = await freshTarget(`phoenix-${label}`);
      const oldTarget = target;
      const l = local.descriptors([0], [1 << 20]);
      const oldRemote = oldPeer.region('kv').descriptors([0], [1 << 20]);
      await agent.write(l, oldRemote);
      stopProcess(oldTarget.child.pid!);
      const pending = [agent.write(l, oldRemote), agent.read(l, oldRemote)];
      const newPeer = await freshTarget(`phoenix-${label}`); // same name, new process
      expect(newPeer.name).toBe(oldPeer.name);
      const outcomes = await Promise.all(pending.map((t) => t.then(() => 'ok', (e: KvwireError) => e.code)));
      expect(outcomes).toEqual(['ERR_REMOTE_DISCONNECT', 'ERR_REMOTE_DISCONNECT']);
      // A list built from the old instance is refused; one from the new instance works.
      await expect(agent.write(l, oldRemote)).rejects.toMatchObject({ code: 'ERR_MISMATCH' });
      const stats = await agent.write(l, newPeer.region('kv').descriptors([0], [1 << 20]));
      expect(stats.bytes).toBe(1 << 20);
      oldTarget.kill();
      agent.forgetPeer(newPeer);
      await target.close();
    });

    it('close() rejects in-flight transfers with ERR_CANCELED', async () => {
      const peer = await freshTarget(`closing-${label}`);
      const other = await Agent.create({ name: `closer-${label}`, ucx: { transports } });
      const mine = other.register(Buffer.alloc(1 << 20), { name: 'x' });
      const p = other.loadPeer(Buffer.from(target.metadata, 'base64'));
      // Connect fully first: UCX 1.13 aborts a peer that resumes to find its half-made connection gone.
      await other.write(mine.descriptors([0], [64]), p.region('kv').descriptors([0], [64]));
      stopProcess(target.child.pid!);
      const t = other.write(mine.descriptors([0], [1 << 20]), p.region('kv').descriptors([0], [1 << 20]));
      await other.close();
      await expect(t).rejects.toMatchObject({ code: 'ERR_CANCELED' });
      process.kill(target.child.pid!, 'SIGCONT');
      agent.forgetPeer(peer);
      await target.close();
    });
  });
}

describe('an early end waits for bytes still landing', () => {
  it('a READ canceled during its background copy settles only after the copy, and nothing changes after', async () => {
    const a = await Agent.create({ name: 'quiet-a', ucx: { transports: 'shm,self' } });
    const b = await Agent.create({ name: 'quiet-b', ucx: { transports: 'shm,self' } });
    const SIZE = 96 << 20;
    const src = b.allocate(SIZE, { name: 'kv' });
    src.bytes.fill(7);
    const dst = a.allocate(SIZE, { name: 'dst' });
    const peer = a.loadPeer(b.metadata());
    const t = a.read(dst.descriptors([0], [SIZE]), peer.region('kv').descriptors([0], [SIZE]));
    expect(t.stats).toBeUndefined();
    expect(t.cancel()).toBe(true); // the copy threads are already running
    const err = await t.then(() => null, (e: KvwireError) => e);
    expect(err?.code).toBe('ERR_CANCELED');
    // Settled only once the copy stopped: every byte is in, and none changes afterwards.
    const first = Buffer.from(dst.bytes.subarray(SIZE - 4096));
    await new Promise((r) => setTimeout(r, 50));
    expect(Buffer.from(dst.bytes.subarray(SIZE - 4096)).equals(first)).toBe(true);
    expect(dst.bytes.every((x) => x === 7)).toBe(true);
    await a.close();
    await b.close();
  });
});

describe('notifications', () => {
  it('arrive as events and through the async iterator, named by the connection', async () => {
    const a = await Agent.create({ name: 'note-a' });
    const b = await Agent.create({ name: 'note-b' });
    const rb = b.register(Buffer.alloc(4096), { name: 'kv' });
    const peerB = a.loadPeer(b.metadata());
    const seen: string[] = [];
    b.on('notification', (n) => seen.push(`${n.from}:${n.message.toString()}`));
    const it = b.notifications();
    await a.notify(peerB, 'standalone');
    const first = await it.next();
    expect(first.value).toMatchObject({ from: 'note-a' });
    expect(first.value!.message.toString()).toBe('standalone');
    const l = a.register(Buffer.alloc(4096).fill(3), { name: 'l' });
    await a.write(l.descriptors([0], [4096]), peerB.region('kv').descriptors([0], [4096]), { notify: Buffer.from('req-17') });
    const second = await it.next();
    expect(second.value!.message.toString()).toBe('req-17');
    expect(rb.bytes[4095]).toBe(3);
    expect(seen).toEqual(['note-a:standalone', 'note-a:req-17']);
    await expect(a.notify('nobody', 'x')).rejects.toMatchObject({ code: 'ERR_NOT_FOUND' });
    await b.close();
    expect((await it.next()).done).toBe(true); // the iterator ends with the agent
    await a.close();
  });
});

describe('process integration', () => {
  it('a registered Buffer survives gc() while registered', () => {
    const out = execFileSync(process.execPath, ['--expose-gc', fixture('gc-pin.cjs')], { encoding: 'utf8', timeout: 60_000 });
    const result = JSON.parse(out.trim().split('\n').pop()!);
    expect(result.unregisteredCollected).toBe(true);
    expect(result.firstBadByte).toBe(-1);
  });

  it('agents in worker_threads tear down cleanly when the thread exits', () => {
    const out = execFileSync(process.execPath, [fixture('worker-thread.cjs')], { encoding: 'utf8', timeout: 60_000 });
    const result = JSON.parse(out.trim().split('\n').pop()!);
    expect(result.results).toHaveLength(3);
    for (const r of result.results) expect(r).toMatchObject({ ok: true, bytes: 1 << 20, code: 0 });
  });
});
