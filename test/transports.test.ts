// UCX_TLS-style transport lists as users write them: aliases (sm, mm), exclusions (^tcp) and plain
// names must all leave kvwire a working path. kvwire turns on UCX_MM_ERROR_HANDLING whenever shared
// memory may be used (its endpoints need peer-failure detection, and without it UCX has no
// active-message transport over shared memory: measured, 0 messages delivered with 'sm,self' before
// the alias was recognised), and sets tcp's send segment size only while its own worker opens.
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../lib';

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

describe('transport lists', () => {
  for (const transports of ['sm,self', 'mm,self', '^tcp', 'shm,self', 'tcp']) {
    it(`'${transports}': a WRITE and a READ move every byte`, async () => {
      const a = await Agent.create({ name: 'tls-a', ucx: { transports } });
      const b = await Agent.create({ name: 'tls-b', ucx: { transports } });
      cleanup.push(() => a.close(), () => b.close());
      const src = a.register(randomBytes(1 << 17), { name: 'src' });
      b.register(Buffer.alloc(1 << 17), { name: 'dst' });
      const peer = a.loadPeer(b.metadata());
      await a.write(src.descriptors([0], [1 << 16]), peer.region('dst').descriptors([0], [1 << 16]), { deadlineMs: 5000 });
      await a.read(src.descriptors([1 << 16], [1 << 16]), peer.region('dst').descriptors([0], [1 << 16]), { deadlineMs: 5000 });
      expect(Buffer.from(src.bytes.subarray(1 << 16)).equals(Buffer.from(src.bytes.subarray(0, 1 << 16)))).toBe(true);
    });
  }

  it('tcp send segments are not left in the environment (child processes and other UCX users do not inherit them)', async () => {
    const a = await Agent.create({ name: 'tls-env', ucx: { transports: 'tcp' } });
    cleanup.push(() => a.close());
    expect(process.env.UCX_TCP_TX_SEG_SIZE).toBeUndefined();
  });
});
