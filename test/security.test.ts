// Authenticated connections: with a `secret`, a connection is served only after a mutual HMAC
// challenge-response (native/backends/ucx/wire.h). Real agents in their own processes, and the
// hostile-peer tool (test/hostile/hostile_peer.cc) as a process that can reach the worker but does
// not hold the secret.
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent, KvwireError } from '../lib';
import { expectServedBothWays, openMetadata, PeerProcess, runHostileTool, sealMetadata, stopProcess } from './helpers';

// The tool gets the target's worker address from its metadata, opened here: the test knows the
// secret; a real outsider would have to learn the address some other way (or scan for it).
const attack = (transports: string, metadata: string, ...args: string[]) =>
  runHostileTool(transports, openMetadata(Buffer.from(metadata, 'base64'), SECRET), ...args);

const SECRET = 'correct horse battery staple';
const cleanup: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

async function secretTarget(name: string, transports: string, secret: string | null = SECRET) {
  const target = new PeerProcess(name, {}, 'fixtures/hostile-target.cjs');
  cleanup.push(() => target.close());
  const { metadata } = await target.ok('init', { name, transports, secret: secret ?? undefined });
  return { target, metadata };
}

describe('authenticated connections (secret)', () => {
  for (const transports of ['shm,self', 'tcp']) {
    it(`agents sharing a secret move data and notifications both ways; 'from' is the proven name (${transports})`, async () => {
      const target = new PeerProcess('sec-target', {}, 'fixtures/peer.cjs');
      cleanup.push(() => target.close());
      const t = await target.ok('init', { name: 'sec-target', transports, secret: SECRET, memory: 'registered', size: 1 << 16 });
      await target.ok('fill', { seed: 9 });
      const me = await Agent.create({ name: 'sec-initiator', secret: SECRET, ucx: { transports } });
      cleanup.push(() => me.close());
      const peer = me.loadPeer(Buffer.from(t.metadata, 'base64'));
      const mine = me.register(Buffer.alloc(1 << 16, 0x5a), { name: 'mine' });
      const noted = target.waitEvent('notification');
      // Posted at once: they wait (natively) for the handshake, then go out in order.
      const [w, r] = [
        me.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), { notify: 'wrote' }),
        me.read(mine.descriptors([8192], [4096]), peer.region('kv').descriptors([4096], [4096])),
      ];
      await Promise.all([w, r]);
      const note = await noted;
      expect(note).toMatchObject({ from: 'sec-initiator', message: 'wrote' });
      const [theirs, ours] = await Promise.all([
        target.ok('hash', { offsets: [0, 4096], lengths: [4096, 4096] }),
        Promise.resolve(
          require('node:crypto')
            .createHash('sha256')
            .update(mine.bytes.subarray(0, 4096))
            .update(mine.bytes.subarray(8192, 12288))
            .digest('hex'),
        ),
      ]);
      expect(theirs.hash).toBe(ours);
      expect(me.security).toEqual({ droppedUnauthenticated: 0, failedHandshakes: 0, refusedAddresses: 0 });
    });
  }

  it('an agent without the secret cannot read a secret agent\'s metadata; given it in the clear, it is refused with ERR_NOT_ALLOWED and nothing it sent lands', async () => {
    const transports = 'shm,self';
    const { target, metadata } = await secretTarget('sec-strict', transports);
    const outsider = await Agent.create({ name: 'outsider', ucx: { transports } });
    cleanup.push(() => outsider.close());
    const sealed = Buffer.from(metadata, 'base64');
    expect(sealed.includes(Buffer.from('sec-strict'))).toBe(false); // sealed: not even the name shows
    expect(() => outsider.loadPeer(sealed)).toThrow(expect.objectContaining({ code: 'ERR_NOT_ALLOWED', message: expect.stringMatching(/sealed/) }));
    const peer = outsider.loadPeer(openMetadata(sealed, SECRET)); // leaked in the clear
    const mine = outsider.register(Buffer.alloc(4096, 0xee), { name: 'mine' });
    const started = Date.now();
    const err = await outsider.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), { notify: 'hi' }).then(
      () => null,
      (e) => e,
    );
    expect(err).toBeInstanceOf(KvwireError);
    expect(err.code).toBe('ERR_NOT_ALLOWED');
    expect(err.message).toMatch(/authenticated connections/);
    expect(Date.now() - started).toBeLessThan(2000);
    await expect(outsider.notify('sec-strict', 'again')).rejects.toMatchObject({ code: 'ERR_NOT_ALLOWED' });
    const after = await target.ok('check');
    expect(after).toMatchObject({ kvIntact: true, guards: true, notifications: 0 });
    expect(after.security.droppedUnauthenticated).toBeGreaterThan(0);
  });

  it('an agent with a secret refuses to talk to a target that does not authenticate', async () => {
    const transports = 'shm,self';
    // The target has no secret; its metadata reached the initiator sealed by someone holding the
    // initiator's secret (so loadPeer accepts it).
    const { target, metadata } = await secretTarget('sec-open', transports, null);
    const me = await Agent.create({ name: 'sec-demanding', secret: SECRET, ucx: { transports } });
    cleanup.push(() => me.close());
    const peer = me.loadPeer(sealMetadata(Buffer.from(metadata, 'base64'), SECRET));
    const mine = me.register(Buffer.alloc(4096, 0xee), { name: 'mine' });
    await expect(me.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]))).rejects.toMatchObject({
      code: 'ERR_NOT_ALLOWED',
      message: expect.stringMatching(/does not authenticate/),
    });
    expect((await target.ok('check')).kvIntact).toBe(true);
  });

  it('a target that never answers the handshake fails the waiting transfers within a few seconds', async () => {
    const transports = 'shm,self';
    const { target, metadata } = await secretTarget('sec-silent', transports);
    const me = await Agent.create({ name: 'sec-waiting', secret: SECRET, ucx: { transports } });
    cleanup.push(() => me.close());
    stopProcess(target.child.pid!);
    try {
      const peer = me.loadPeer(Buffer.from(metadata, 'base64'));
      const mine = me.register(Buffer.alloc(4096), { name: 'mine' });
      const started = Date.now();
      const err = await me.read(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096])).then(
        () => null,
        (e) => e,
      );
      expect(err?.code).toBe('ERR_REMOTE_DISCONNECT');
      expect(err.message).toMatch(/authenticated handshake/);
      expect(Date.now() - started).toBeLessThan(6000);
    } finally {
      process.kill(target.child.pid!, 'SIGCONT');
    }
  });

  for (const transports of ['shm,self', 'tcp']) {
    it(`a process without the secret: garbage addresses, wrong proofs and every data-plane message are dropped and counted; nothing is served (${transports})`, async () => {
      const { target, metadata } = await secretTarget('sec-attacked', transports);
      const sent = await attack(transports, metadata, 'unauth', '200');
      expect(sent).toBe(200 * 11);
      expect(target.child.exitCode).toBeNull();
      const after = await target.ok('check');
      // Region untouched (no WRITE, packed WRITE or commit served), no notification delivered.
      expect(after).toMatchObject({ kvIntact: true, guards: true, readOnlyIntact: true, notifications: 0 });
      // 200 x (WRITE, packed WRITE, commit, READ request, NOTIFY, PING, BYE) never served, 400 AUTHs
      // for no pending handshake or of the wrong size; the 200 well-sized AUTHs name a nonce the
      // target never issued (or one it did, with a wrong proof: counted as a failed handshake).
      const { droppedUnauthenticated, failedHandshakes } = after.security;
      expect(droppedUnauthenticated + failedHandshakes).toBeGreaterThanOrEqual(200 * 7 + 400);
      // The malformed-message run, against the same agent, is dropped the same way.
      expect(await attack(transports, metadata, 'malformed', '3')).toBeGreaterThan(10_000);
      expect(await target.ok('check')).toMatchObject({ kvIntact: true, guards: true, readOnlyIntact: true, notifications: 0 });
      // A peer holding the secret is still served, both ways.
      const legit = await expectServedBothWays(transports, metadata, { secret: SECRET, fill: 0x33, notify: 'real' });
      cleanup.push(() => legit.close());
      const final = await target.ok('check');
      expect(final).toMatchObject({ guards: true, notifications: 1 });
    });
  }

  // UCX emulates RMA over tcp in software: the target's UCX writes wherever the PUT says, and no
  // kvwire handler runs. Without a secret that is part of "any process that can reach it is trusted";
  // with one, the agent runs without UCX's RMA feature, so the same PUT changes nothing.
  for (const withSecret of [false, true]) {
    it(`a raw UCX PUT with the published key over tcp ${withSecret ? 'does not land on an agent with a secret' : 'lands on an agent without a secret (the trust model says so)'}`, async () => {
      const { target, metadata } = await secretTarget(withSecret ? 'rma-sealed' : 'rma-open', 'tcp', withSecret ? SECRET : null);
      const plain = withSecret ? openMetadata(Buffer.from(metadata, 'base64'), SECRET) : Buffer.from(metadata, 'base64');
      expect(await runHostileTool('tcp', plain, 'rmaput')).toBe(1);
      await new Promise((r) => setTimeout(r, 200));
      expect(target.child.exitCode).toBeNull();
      const after = await target.ok('check');
      // The PUT aims at the first region the metadata lists ('kv' or the read-only 'ro': UCX ignores
      // kvwire's access rights too).
      expect(after.kvIntact && after.readOnlyIntact).toBe(withSecret);
      expect(after.guards).toBe(true);
    });
  }

  it('path rma is unavailable on an agent with a secret', async () => {
    const { metadata } = await secretTarget('rma-path', 'tcp');
    const me = await Agent.create({ name: 'rma-user', secret: SECRET, ucx: { transports: 'tcp' } });
    cleanup.push(() => me.close());
    const peer = me.loadPeer(Buffer.from(metadata, 'base64'));
    const mine = me.register(Buffer.alloc(4096), { name: 'mine' });
    await expect(me.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), { path: 'rma' })).rejects.toMatchObject({
      code: 'ERR_UNAVAILABLE',
      message: expect.stringMatching(/'rma' is off on an agent with a secret/),
    });
    await me.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), { path: 'am' });
  });

  for (const transports of ['shm,self', 'tcp']) {
    it(`two agents with a secret that load each other move data and notifications both ways (${transports})`, async () => {
      const a = new PeerProcess('mutual-a');
      const b = new PeerProcess('mutual-b');
      cleanup.push(() => a.close(), () => b.close());
      const [ma, mb] = await Promise.all([
        a.ok('init', { name: 'mutual-a', transports, secret: SECRET, memory: 'registered', size: 1 << 16 }),
        b.ok('init', { name: 'mutual-b', transports, secret: SECRET, memory: 'registered', size: 1 << 16 }),
      ]);
      await Promise.all([a.ok('fill', { seed: 1 }), b.ok('fill', { seed: 2 })]);
      // Both load at once, so the two handshakes cross.
      await Promise.all([a.ok('load', { metadata: mb.metadata }), b.ok('load', { metadata: ma.metadata })]);
      for (let round = 0; round < 3; round++) {
        const spec = JSON.stringify({ offsets: [round * 8192], lengths: [4096] });
        const noted = b.waitEvent('notification', 10_000, (m) => m.message === spec);
        await Promise.all([
          a.ok('transfer', { op: 'write', peer: 'mutual-b', localOffsets: [round * 8192], remoteOffsets: [round * 8192], lengths: [4096], notify: spec }),
          b.ok('transfer', { op: 'write', peer: 'mutual-a', localOffsets: [round * 8192 + 4096], remoteOffsets: [round * 8192 + 4096], lengths: [4096] }),
          a.ok('transfer', { op: 'read', peer: 'mutual-b', localOffsets: [32768], remoteOffsets: [32768], lengths: [4096] }),
        ]);
        const seen = await noted;
        expect(seen.from).toBe('mutual-a');
        const [ha, hb] = await Promise.all([a.ok('hash', { offsets: [round * 8192], lengths: [8192] }), b.ok('hash', { offsets: [round * 8192], lengths: [8192] })]);
        expect(ha.hash).toBe(hb.hash);
      }
    });
  }

  it('warns once when an agent may be reachable beyond loopback without a secret', () => {
    const script = `
      const { Agent } = require(${JSON.stringify(path.join(__dirname, '..', 'dist'))});
      (async () => {
        const quiet = await Agent.create({ name: 'w-shm', ucx: { transports: 'shm,self' } });
        const secret = await Agent.create({ name: 'w-secret', secret: 's', ucx: { transports: 'tcp' } });
        const a = await Agent.create({ name: 'w-tcp', ucx: { transports: 'tcp' } });
        const b = await Agent.create({ name: 'w-tcp-2', ucx: { transports: 'tcp' } });
        for (const x of [quiet, secret, a, b]) await x.close();
      })();`;
    const r = spawnSync(process.execPath, ['-e', script], {
      env: { ...process.env, NODE_OPTIONS: '', UCX_WARN_UNUSED_ENV_VARS: 'n' },
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.status).toBe(0);
    const warnings = r.stderr.split('\n').filter((l) => l.includes('KVWIRE_NO_SECRET'));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain("agent 'w-tcp'");
  });

  it('validates the secret', async () => {
    await expect(Agent.create({ name: 'x', secret: '' })).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM', message: expect.stringContaining('secret') });
    await expect(Agent.create({ name: 'x', secret: Buffer.alloc(4097) })).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
    await expect(Agent.create({ name: 'x', secret: 42 as any })).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
  });
});
