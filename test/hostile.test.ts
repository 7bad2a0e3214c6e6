// Attacks from a hostile peer (test/hostile/hostile_peer.cc: a plain UCX program speaking kvwire's
// wire protocol) against agents in their own processes: the target never crashes, never writes
// outside its regions or into a read-only one, completes nothing for a forger, and keeps serving a
// legitimate peer afterwards.
import { existsSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../lib';
import { expectServedBothWays, HOSTILE_TOOL, PeerProcess, runHostileTool, startHostileTool, stopProcess, UCX_113 } from './helpers';

const attack = (transports: string, base64Metadata: string, ...args: string[]) =>
  runHostileTool(transports, Buffer.from(base64Metadata, 'base64'), ...args);

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

describe('hostile peer', () => {
  it('the tool is built', () => {
    expect(existsSync(HOSTILE_TOOL), `${HOSTILE_TOOL} (npm run build:native builds it)`).toBe(true);
  });

  for (const transports of ['shm,self', 'tcp']) {
    it(`malformed messages of every type (${transports}${UCX_113 ? '; ids >= 32768 left out on UCX 1.13' : ''}): no crash, no write outside a region, still serving`, async () => {
      const target = new PeerProcess('hostile-target', {}, 'fixtures/hostile-target.cjs');
      cleanup.push(() => target.close());
      const { metadata } = await target.ok('init', { name: 'hostile-target', transports });
      const sent = await attack(transports, metadata, 'malformed', '11');
      expect(sent).toBeGreaterThan(10_000);
      expect(target.child.exitCode).toBeNull(); // still running
      const after = await target.ok('check');
      expect(after).toMatchObject({ guards: true, readOnlyIntact: true });
      // A legitimate peer is still served, both ways.
      const legit = await expectServedBothWays(transports, metadata, { fill: 0x33 });
      cleanup.push(() => legit.close());
      expect((await target.ok('check')).guards).toBe(true);
    });
  }

  for (const transports of ['shm,self', 'tcp']) {
    it(`HELLOs with random, other-version, truncated and over-long worker addresses, at a target without a secret, are refused before UCX parses them (${transports})`, async () => {
      const target = new PeerProcess('addr-target', {}, 'fixtures/hostile-target.cjs');
      cleanup.push(() => target.close());
      const { metadata } = await target.ok('init', { name: 'addr-target', transports });
      // 4 per round: without the check, the first alone (random bytes) aborted UCX 1.13 in 88% of
      // tries (ucp_address_unpack: "addr version"), so the target died within the first round.
      const sent = await attack(transports, metadata, 'badaddress', '150');
      expect(sent).toBe(600);
      expect(target.child.exitCode).toBeNull();
      const after = await target.ok('check');
      expect(after.security.refusedAddresses).toBe(600);
      expect(after).toMatchObject({ guards: true, readOnlyIntact: true });
      const legit = await expectServedBothWays(transports, metadata, { fill: 0x35, notify: 'after' });
      cleanup.push(() => legit.close());
      expect((await target.ok('check')).security.refusedAddresses).toBe(600); // a real address passes
    });
  }

  it('a peer that opens 200,000 WRITEs it never finishes and asks for reads it never takes: bounded state, still serving', async () => {
    const transports = 'shm,self';
    const target = new PeerProcess('flood-target', {}, 'fixtures/hostile-target.cjs');
    cleanup.push(() => target.close());
    const { metadata } = await target.ok('init', { name: 'flood-target', transports });
    const before = (await target.ok('check')).rss;
    // The flooder holds its connection open (not progressing) while the target is measured.
    const child = startHostileTool(transports, Buffer.from(metadata, 'base64'), ['flood', '100000', '4000']);
    const exited = new Promise((resolve) => child.on('exit', resolve));
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d) => String(d).includes('flooded') && resolve());
      child.on('exit', (code) => reject(new Error(`flooder exited with ${code} before flooding`)));
    });
    await new Promise((r) => setTimeout(r, 300)); // the target has handled what arrived
    const during = await target.ok('check');
    // 100,000 segments + 100,000 commits for fresh ids, 6,250 reads of 64 KiB: without per-connection
    // bounds each open WRITE stayed in the target's tables until the connection ended.
    expect(during.rss - before, `RSS grew by ${((during.rss - before) / 2 ** 20).toFixed(1)} MiB`).toBeLessThan(24 << 20);
    console.log(`flood: target RSS grew ${((during.rss - before) / 2 ** 20).toFixed(1)} MiB`);
    const legit = await Agent.create({ name: 'legit-flood', ucx: { transports } });
    cleanup.push(() => legit.close());
    const peer = legit.loadPeer(Buffer.from(metadata, 'base64'));
    const mine = legit.register(Buffer.alloc(4096, 0x44), { name: 'mine' });
    await legit.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([8192], [4096]));
    expect(during.guards).toBe(true);
    await exited;
  });

  it('forged READ_DONE / ACK / read data for 5,000 sequential and 5,000 random ids do not complete a pending READ', async () => {
    const transports = 'shm,self';
    const target = new PeerProcess('forge-target', {}, 'fixtures/peer.cjs');
    const victim = new PeerProcess('forge-victim', {}, 'fixtures/peer.cjs');
    cleanup.push(() => target.close(), () => victim.close());
    const t = await target.ok('init', { name: 'forge-target', transports, memory: 'registered', size: 1 << 16 });
    const v = await victim.ok('init', { name: 'forge-victim', transports, memory: 'registered', size: 1 << 16 });
    await target.ok('fill', { seed: 5 });
    await victim.ok('load', { metadata: t.metadata });
    stopProcess(t.pid); // the real target cannot answer: the READ stays pending
    let settled: any = null;
    const reading = victim.call('transfer', { op: 'read', peer: 'forge-target', localOffsets: [0], remoteOffsets: [0], lengths: [4096], deadlineMs: 60_000 });
    void reading.then((r) => (settled = r));
    try {
      await new Promise((r) => setTimeout(r, 100));
      const sent = await attack(transports, v.metadata, 'forge', '5000');
      expect(sent).toBe(2 + 4 * 10_000); // HELLO and a notification, then four forgeries per id
      await new Promise((r) => setTimeout(r, 300));
      expect(settled).toBeNull(); // nothing the forger sent completed it
    } finally {
      process.kill(t.pid, 'SIGCONT');
    }
    const r = await reading;
    expect(r).toMatchObject({ ok: true });
    // Its bytes are the real target's, not the forger's 0xEE.
    const [mine, theirs] = await Promise.all([victim.ok('hash', { offsets: [0], lengths: [4096] }), target.ok('hash', { offsets: [0], lengths: [4096] })]);
    expect(mine.hash).toBe(theirs.hash);
  });
});
