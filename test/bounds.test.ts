// The direct path copies through the peer's memory mapped into this process (ucp_rkey_ptr, which
// checks no bounds). Bounds come from the mapping this process holds, never from the length or base
// a peer claims: a region that does not fit is refused at loadPeer.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvwireError } from '../lib';
import { reseal } from './helpers';

/** Offset of the first region's `base` field in a metadata blob (layout in native/core/metadata.cc). */
function firstRegionBaseAt(blob: Buffer): number {
  let p = 12;
  p += 1 + blob[p] + 8 + 8; // name, agent id, generation
  p += 1 + blob[p]; // backend
  p += 4 + blob.readUInt32LE(p); // worker address
  p += 4; // region count
  p += 4; // region id
  p += 1 + blob[p]; // region name
  return p + 1 + 1 + 1 + 4; // kind, access, flags, device id
}

describe('direct-path bounds come from the real mapping', () => {
  let owner: Agent;
  let loader: Agent;
  let blob: Buffer;
  beforeAll(async () => {
    owner = await Agent.create({ name: 'owner', ucx: { transports: 'shm,self' } });
    loader = await Agent.create({ name: 'loader', ucx: { transports: 'shm,self' } });
    owner.allocate(64 << 10, { name: 'kv' }).bytes.fill(3);
    blob = Buffer.from(owner.metadata());
  });
  afterAll(async () => {
    await loader.close();
    await owner.close();
  });

  it('the honest blob loads and moves over the direct path', async () => {
    const peer = loader.loadPeer(blob);
    const mine = loader.allocate(64 << 10, { name: 'mine' });
    const stats = await loader.read(mine.descriptors([0], [64 << 10]), peer.region('kv').descriptors([0], [64 << 10]));
    expect(stats.path).toBe('direct');
    expect(mine.bytes.every((x) => x === 3)).toBe(true);
    loader.forgetPeer(peer);
  });

  for (const [what, lie] of [
    ['a length of 1 GiB for 64 KiB allocated', (b: Buffer, at: number) => b.writeBigUInt64LE(1n << 30n, at + 8)],
    ['a length one page past the mapping', (b: Buffer, at: number) => b.writeBigUInt64LE((64n << 10n) + 4096n * 64n, at + 8)],
    ['a base 1 GiB past its own', (b: Buffer, at: number) => b.writeBigUInt64LE(b.readBigUInt64LE(at) + (1n << 30n), at)],
  ] as const) {
    it(`a region claiming ${what} is refused at loadPeer with ERR_INVALID_PARAM`, () => {
      const lying = Buffer.from(blob);
      lie(lying, firstRegionBaseAt(lying));
      let error: unknown;
      try {
        loader.loadPeer(reseal(lying));
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(KvwireError);
      expect((error as KvwireError).code).toBe('ERR_INVALID_PARAM');
      expect((error as Error).message).toMatch(/claims \d+ bytes, but only \d+ are mapped/);
    });
  }
});
