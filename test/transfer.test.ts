// Two real processes move random data over real UCX, both directions, on allocated and registered
// memory, over shared memory and over tcp. Content is checked by hash on both sides, and every
// notification is checked to arrive after the data it announces.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PeerProcess, connect, mixedLengths, place } from './helpers';

const SIZE = 48 << 20;
const BATCHES = [
  { count: 1, min: 16 << 20, max: 16 << 20 },
  { count: 64, min: 64, max: 1 << 20 },
  { count: 10_000, min: 64, max: 8 << 10 },
  { count: 100_000, min: 64, max: 256 },
];
const TRANSPORTS = [
  { label: 'shm', transports: 'shm,self' },
  { label: 'tcp', transports: 'tcp' },
];
// Registered memory on shm goes by path 'cma' (batches from 256 KiB, mean segment from 16 KiB) and active messages (else);
// with cma turned off, by active messages only, so both are covered at every size.
const MEMORY = [
  { memory: 'allocated', cma: true },
  { memory: 'registered', cma: true },
  { memory: 'registered', cma: false },
] as const;

for (const { label, transports } of TRANSPORTS) {
  for (const { memory, cma } of MEMORY) {
    if (!cma && label !== 'shm') continue; // over tcp cma is never used anyway
    describe(`${label}, ${memory} memory${cma ? '' : ', cma off'}`, () => {
      const a = new PeerProcess(`init-${label}-${memory}-${cma}`);
      const b = new PeerProcess(`target-${label}-${memory}-${cma}`);
      const cmaExpected = label === 'shm' && memory === 'registered' && cma;
      beforeAll(async () => {
        await Promise.all([a.init({ transports, memory, size: SIZE, cma }), b.init({ transports, memory, size: SIZE, cma })]);
        await connect(a, b);
        // The grant takes one round trip after the handshake; until then 'auto' uses active messages.
        const granted = label === 'shm' && cma; // same host, shared memory allowed, not turned off
        const ready = await a.ok('cmaReady', { peer: b.name, ms: granted ? 5000 : 200 });
        expect(ready.ready).toBe(granted);
      });
      afterAll(async () => {
        await Promise.all([a.close(), b.close()]);
      });

      let seed = 1;
      for (const op of ['write', 'read'] as const) {
        for (const batch of BATCHES) {
          it(`${op.toUpperCase()} ${batch.count} descriptors (${batch.min}..${batch.max} B)`, async () => {
            seed += 2;
            const lengths = mixedLengths(seed, batch.count, batch.min, batch.max);
            const localOffsets = place(seed + 100, lengths, SIZE);
            const remoteOffsets = place(seed + 200, lengths, SIZE);
            await Promise.all([a.ok('fill', { seed }), b.ok('fill', { seed: seed + 1 })]);
            const src = op === 'write' ? a : b;
            const srcOffsets = op === 'write' ? localOffsets : remoteOffsets;
            const dst = op === 'write' ? b : a;
            const dstOffsets = op === 'write' ? remoteOffsets : localOffsets;
            const expected = (await src.ok('hash', { offsets: srcOffsets, lengths })).hash;
            const before = (await dst.ok('hash', { offsets: dstOffsets, lengths })).hash;
            expect(before).not.toBe(expected); // the check below can fail

            const notify = JSON.stringify({ offsets: remoteOffsets.slice(0, 2000), lengths: lengths.slice(0, 2000) });
            const notified = b.waitEvent('notification', 30_000);
            const r = await a.ok('transfer', { op, peer: b.name, localOffsets, remoteOffsets, lengths, notify });
            expect(r.stats.bytes).toBe(lengths.reduce((x, y) => x + y, 0));
            expect(r.stats.descriptors).toBe(batch.count);
            expect(r.stats.segments).toBeLessThanOrEqual(batch.count);
            const meanSegment = r.stats.bytes / r.stats.segments;
            expect(r.stats.path).toBe(memory === 'allocated' && label === 'shm' ? 'direct' : cmaExpected && meanSegment >= 16 << 10 && r.stats.bytes >= 256 << 10 ? 'cma' : 'am');
            expect((await dst.ok('hash', { offsets: dstOffsets, lengths })).hash).toBe(expected);

            const n = await notified;
            expect(n.from).toBe(a.name);
            if (op === 'write') {
              // The target hashed the announced ranges the moment the notification arrived.
              const prefix = (await a.ok('hash', { offsets: localOffsets.slice(0, 2000), lengths: lengths.slice(0, 2000) })).hash;
              expect(n.hash).toBe(prefix);
            }
          }, 60_000);
        }
      }

      it('path rma (opt-in): put/get + flush moves the same bytes, notification after', async () => {
        const lengths = mixedLengths(99, 32, 64, 64 << 10);
        const localOffsets = place(991, lengths, SIZE);
        const remoteOffsets = place(992, lengths, SIZE);
        for (const op of ['write', 'read'] as const) {
          await Promise.all([a.ok('fill', { seed: 50 }), b.ok('fill', { seed: 51 })]);
          const [src, srcOffsets, dst, dstOffsets] =
            op === 'write' ? [a, localOffsets, b, remoteOffsets] : [b, remoteOffsets, a, localOffsets];
          const expected = (await src.ok('hash', { offsets: srcOffsets, lengths })).hash;
          const notified = b.waitEvent('notification');
          const r = await a.ok('transfer', { op, peer: b.name, localOffsets, remoteOffsets, lengths, path: 'rma', notify: 'rma' });
          expect(r.stats.path).toBe('rma');
          expect((await dst.ok('hash', { offsets: dstOffsets, lengths })).hash).toBe(expected);
          expect((await notified).message).toBe('rma');
        }
      });
    });
  }
}
