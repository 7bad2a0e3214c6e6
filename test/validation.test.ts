// Bad input: every case settles with its KvwireError code and, where one descriptor is at fault, its index.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvwireError, type Peer, type Region } from '../lib';
import { addon } from '../lib/native';
import { thrown } from './helpers';

async function rejection(p: PromiseLike<unknown>): Promise<KvwireError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(KvwireError);
    return e as KvwireError;
  }
  throw new Error('expected a rejection');
}


describe('validation', () => {
  let a: Agent;
  let b: Agent;
  let local: Region;
  let peer: Peer;
  beforeAll(async () => {
    a = await Agent.create({ name: 'val-a' });
    b = await Agent.create({ name: 'val-b' });
    local = a.register(Buffer.alloc(1 << 16), { name: 'local' });
    b.register(Buffer.alloc(1 << 16), { name: 'kv' });
    b.register(Buffer.alloc(4096), { name: 'ro', access: 'read' });
    b.register(Buffer.alloc(4096), { name: 'wo', access: 'write' });
    peer = a.loadPeer(b.metadata());
  });
  afterAll(async () => {
    await a.close();
    await b.close();
  });

  it('rejects out-of-bounds descriptors with their index, before anything moves', () => {
    expect(thrown(() => local.descriptors([0, 65530], [16, 16]))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    expect(thrown(() => peer.region('kv').descriptors([0, 8, 65536], 8))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 2 });
    expect(thrown(() => local.descriptors([0, -1], 8))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    expect(thrown(() => local.descriptors([0, 1.5], 8))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    expect(thrown(() => local.descriptors([0, 8], [8, 0]))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    expect(thrown(() => local.descriptors([Number.MAX_SAFE_INTEGER], 8))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 0 });
  });

  it('re-checks bounds natively even if the typed arrays were changed after building', async () => {
    const l = local.descriptors([0, 8], 8);
    const r = peer.region('kv').descriptors([0, 8], 8);
    r.offsets[1] = 1 << 20;
    expect(await rejection(a.write(l, r))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    r.offsets[1] = 0.5;
    expect(await rejection(a.write(l, r))).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
  });

  it('rejects unequal counts and per-index length mismatches', async () => {
    const e1 = await rejection(a.write(local.descriptors([0, 8], 8), peer.region('kv').descriptors([0], 8)));
    expect(e1.code).toBe('ERR_INVALID_PARAM');
    expect(e1.message).toMatch(/2 descriptors.*1/);
    const e2 = await rejection(a.read(local.descriptors([0, 8, 16], 8), peer.region('kv').descriptors([0, 8, 16], [8, 8, 4])));
    expect(e2).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 2 });
  });

  it('enforces the access a region was exported with', async () => {
    const w = await rejection(a.write(local.descriptors([0], 8), peer.region('ro').descriptors([0], 8)));
    expect(w.code).toBe('ERR_NOT_ALLOWED');
    expect(w.message).toMatch(/'ro'.*'read'/);
    const r = await rejection(a.read(local.descriptors([0], 8), peer.region('wo').descriptors([0], 8)));
    expect(r.code).toBe('ERR_NOT_ALLOWED');
    // The allowed directions work.
    await a.read(local.descriptors([0], 8), peer.region('ro').descriptors([0], 8));
    await a.write(local.descriptors([0], 8), peer.region('wo').descriptors([0], 8));
  });

  it('rejects an unknown peer, a region it does not publish, and a deregistered local region', async () => {
    expect(thrown(() => peer.region('nope')).code).toBe('ERR_NOT_FOUND');
    const other = await Agent.create({ name: 'val-c' });
    const otherRegion = other.register(Buffer.alloc(64), { name: 'kv' });
    const otherPeer = a.loadPeer(other.metadata());
    const remote = otherPeer.region('kv').descriptors([0], 8);
    a.forgetPeer('val-c');
    expect(await rejection(a.write(local.descriptors([0], 8), remote))).toMatchObject({ code: 'ERR_NOT_FOUND' });
    other.deregister(otherRegion);
    expect(thrown(() => otherRegion.descriptors([0], 8)).code).toBe('ERR_NOT_FOUND');
    await other.close();

    const temp = a.register(Buffer.alloc(64), { name: 'temp' });
    const l = temp.descriptors([0], 8);
    a.deregister(temp);
    expect(await rejection(a.write(l, peer.region('kv').descriptors([0], 8)))).toMatchObject({ code: 'ERR_NOT_FOUND' });
    expect(thrown(() => a.deregister(temp)).code).toBe('ERR_NOT_FOUND');
  });

  it('the target refuses a region it deregistered even if the initiator still has old metadata', async () => {
    const c = await Agent.create({ name: 'val-d' });
    const gone = c.register(Buffer.alloc(4096), { name: 'gone' });
    const old = a.loadPeer(c.metadata());
    c.deregister(gone); // a still believes 'gone' exists
    const e = await rejection(a.write(local.descriptors([0, 100], 8), old.region('gone').descriptors([0, 100], 8)));
    expect(e.code).toBe('ERR_NOT_FOUND');
    expect(e.index).toBe(0);
    a.forgetPeer(old);
    await c.close();
  });

  it('rejects malformed, truncated, foreign and stale metadata', () => {
    const md = b.metadata();
    expect(thrown(() => a.loadPeer(md.subarray(0, md.length - 1))).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.loadPeer(Buffer.from('{"name":"x"}'))).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.loadPeer(new Uint8Array(0))).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.loadPeer('nope' as unknown as Uint8Array)).code).toBe('ERR_INVALID_PARAM');
    // Re-publishing bumps the generation; the older blob is then stale.
    const newer = (b.register(Buffer.alloc(64), { name: 'late' }), b.metadata());
    const p2 = a.loadPeer(newer);
    expect(p2.generation).toBeGreaterThan(peer.generation);
    expect(p2.region('late').length).toBe(64);
    expect(thrown(() => a.loadPeer(md)).code).toBe('ERR_MISMATCH');
    peer = p2;
  });

  it('checks options and arguments at the boundary', async () => {
    await expect(Agent.create({ name: '' })).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
    await expect(Agent.create({ name: 'x', progress: 'spin' as 'poll' })).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
    expect(thrown(() => a.allocate(0, { name: 'z' })).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.register(Buffer.alloc(0), { name: 'z' })).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.register({} as Buffer, { name: 'z' })).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => a.register(Buffer.alloc(8), { name: 'z', access: 'all' as 'read' })).code).toBe('ERR_INVALID_PARAM');
    const l = local.descriptors([0], 8);
    const r = peer.region('kv').descriptors([0], 8);
    expect(await rejection(a.write(l, r, { deadlineMs: -1 }))).toMatchObject({ code: 'ERR_INVALID_PARAM' });
    expect(await rejection(a.write(l, l as never))).toMatchObject({ code: 'ERR_INVALID_PARAM' });
    expect(await rejection(a.write(l, r, { path: 'warp' as 'am' }))).toMatchObject({ code: 'ERR_INVALID_PARAM' });
    expect(await rejection(a.write(l, r, { notify: Buffer.alloc((16 << 20) + 1) }))).toMatchObject({ code: 'ERR_INVALID_PARAM' });
    await expect(a.notify(peer, 42 as unknown as string)).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
    const direct = await rejection(a.write(l, r, { path: 'direct' }));
    expect(direct.code).toBe('ERR_UNAVAILABLE'); // registered Buffer memory is never mapped into a peer
  });

  it('signs metadata with a shared secret and refuses unsigned or foreign blobs', async () => {
    const s1 = await Agent.create({ name: 'sig-1', secret: 'k1' });
    const s2 = await Agent.create({ name: 'sig-2', secret: 'k1' });
    const s3 = await Agent.create({ name: 'sig-3', secret: 'other' });
    s2.register(Buffer.alloc(64), { name: 'kv' });
    expect(s1.loadPeer(s2.metadata()).name).toBe('sig-2');
    expect(thrown(() => s3.loadPeer(s2.metadata())).code).toBe('ERR_NOT_ALLOWED');
    expect(thrown(() => s1.loadPeer(b.metadata())).code).toBe('ERR_NOT_ALLOWED');
    const tampered = Buffer.from(s2.metadata());
    tampered[20] ^= 1;
    expect(thrown(() => s1.loadPeer(tampered)).code).toBe('ERR_NOT_ALLOWED');
    await Promise.all([s1.close(), s2.close(), s3.close()]);
  });

  it('operations on a closed agent fail with ERR_CLOSED', async () => {
    const c = await Agent.create({ name: 'val-closed' });
    const r = c.register(Buffer.alloc(64), { name: 'kv' });
    await c.close();
    await c.close(); // idempotent
    expect(thrown(() => c.metadata()).code).toBe('ERR_CLOSED');
    expect(thrown(() => c.allocate(64, { name: 'x' })).code).toBe('ERR_CLOSED');
    expect(r.live).toBe(false);
    await expect(c.notify('val-a', 'x')).rejects.toMatchObject({ code: 'ERR_CLOSED' });
  });
});

describe('copyRuns (the native gather/scatter behind KV staging)', () => {
  it('copies every run, or nothing when one is bad, naming it', () => {
    const src = Uint8Array.from({ length: 32 }, (_, i) => i);
    const dst = new Uint8Array(8);
    addon.copyRuns(dst, Float64Array.of(0, 4), src, Float64Array.of(20, 2), Float64Array.of(4, 4));
    expect([...dst]).toEqual([20, 21, 22, 23, 2, 3, 4, 5]);
    const before = [...dst];
    expect(() => addon.copyRuns(dst, Float64Array.of(0, 5), src, Float64Array.of(0, 0), Float64Array.of(4, 4))).toThrow(
      expect.objectContaining({ code: 'ERR_INVALID_PARAM', index: 1, message: expect.stringMatching(/run 1 .* outside the destination/) }),
    );
    expect(() => addon.copyRuns(dst, Float64Array.of(0), src, Float64Array.of(-1), Float64Array.of(1))).toThrow(
      expect.objectContaining({ code: 'ERR_INVALID_PARAM', index: 0 }),
    );
    expect(() => addon.copyRuns(dst, Float64Array.of(0, 1), src, Float64Array.of(0), Float64Array.of(1))).toThrow(/same length/);
    expect([...dst]).toEqual(before);
  });
});
