// Every way a reader stops early tells the prefill at once: its publication settles ERR_CANCELED
// naming the reader within 100 ms (unless another reader is still working), instead of holding the
// blocks until the lease expires. The prefill runs in its own process; readers run here or in
// processes of their own that exit or are killed mid-read.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvLayout, KvReceiver, KvwireError, type KvLayoutSpec, type Peer } from '../lib';
import { PeerProcess } from './helpers';

const shape = { modelId: 'tiny', layers: 4, tokensPerBlock: 8, kvHeads: 4, headDim: 16, dtypeBytes: 2 };
const prefillSpec: KvLayoutSpec = { ...shape, blocks: 16, tp: { rank: 0, size: 1 } };
const LEASE = 20_000; // far beyond every bound below: a publication that waits for it fails the test
const SETTLE_MS = 100;

/** Now, on the clock the fixtures stamp their events with. */
const now = () => performance.timeOrigin + performance.now();

for (const transports of ['shm,self', 'tcp']) {
  describe(`a reader that stops early frees the publication at once (${transports})`, () => {
    let prefill: PeerProcess;
    let metadata: string;
    let agent: Agent;
    let receiver: KvReceiver;
    let peer: Peer;
    let req = 0;
    const layout = new KvLayout({ ...shape, blocks: 8 });
    const base = () => ({ sources: [peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: [1, 2], destinationBlocks: [3, 4] });

    beforeAll(async () => {
      prefill = new PeerProcess(`prefill-${transports}`, {}, 'fixtures/kv-sender.cjs');
      ({ metadata } = await prefill.ok('init', { name: prefill.name, layout: prefillSpec, transports, fill: true }));
      agent = await Agent.create({ name: 'reader', ucx: { transports } });
      receiver = new KvReceiver(agent, layout, agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' }));
      peer = agent.loadPeer(Buffer.from(metadata, 'base64'));
    });
    afterAll(async () => {
      await agent?.close();
      await prefill?.close();
    });

    /** Publishes a fresh request; resolves with its settle event. */
    async function publish(options: { readers?: number; layersReady?: number; leaseMs?: number } = {}) {
      const id = `r${++req}`;
      const settled = prefill.waitEvent('settled', LEASE + 5_000, (m) => m.req === id);
      await prefill.ok('publish', { req: id, blocks: [1, 2], readers: options.readers ?? 1, leaseMs: options.leaseMs ?? LEASE, layersReady: options.layersReady });
      return { id, settled };
    }

    /** The publication ended ERR_CANCELED naming `reader`, within SETTLE_MS of `stoppedAt`. */
    async function expectFreed(settled: Promise<any>, stoppedAt: number, reader = 'reader', why?: string) {
      const s = await settled;
      expect(s).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
      expect(s.message).toContain(`reader '${reader}'`);
      if (why) expect(s.message).toContain(why);
      expect(s.at - stoppedAt).toBeLessThan(SETTLE_MS);
    }

    async function rejection(p: Promise<unknown>): Promise<KvwireError> {
      const e = await p.then(() => null, (err) => err);
      expect(e).toBeInstanceOf(KvwireError);
      return e as KvwireError;
    }

    it('pull() aborted by its AbortSignal', async () => {
      const { id, settled } = await publish();
      const ac = new AbortController();
      const pulling = receiver.pull({ requestId: id, ...base(), signal: ac.signal });
      ac.abort();
      const e = await rejection(pulling);
      const stoppedAt = now();
      expect(e.code).toBe('ERR_CANCELED');
      await expectFreed(settled, stoppedAt, 'reader', 'aborted');
    });

    it('pull() failing with ERR_NOT_FOUND (no such pool region), with an error that says which name it looked for', async () => {
      const { id, settled } = await publish();
      const e = await rejection(receiver.pull({ requestId: id, ...base(), sourceRegion: 'kv-pool' }));
      const stoppedAt = now();
      expect(e.code).toBe('ERR_NOT_FOUND');
      expect(e.message).toContain("no region 'kv-pool'");
      expect(e.message).toContain("'kv'"); // what it does publish
      await expectFreed(settled, stoppedAt, 'reader', 'kv-pool');
    });

    it('pull() whose transfer fails at the source (the source layout claims blocks the pool lacks)', async () => {
      const { id, settled } = await publish();
      const lying = new KvLayout({ ...prefillSpec, blocks: 64 });
      const e = await rejection(receiver.pull({ requestId: id, ...base(), sourceLayout: lying, sourceBlocks: [60, 61] }));
      const stoppedAt = now();
      expect(e.code).toBe('ERR_INVALID_PARAM');
      await expectFreed(settled, stoppedAt);
    });

    it('pull() refused before any transfer (a source layout that needs two sources, one given)', async () => {
      const { id, settled } = await publish();
      const other = new KvLayout({ ...prefillSpec, tp: { rank: 0, size: 2 } }); // wants 2 sources, gets 1
      const e = await rejection(receiver.pull({ requestId: id, ...base(), sourceLayout: other }));
      const stoppedAt = now();
      expect(e.code).toBe('ERR_INVALID_PARAM');
      await expectFreed(settled, stoppedAt);
    });

    it('stream(): the consumer breaks out of the loop', async () => {
      const { id, settled } = await publish();
      let stoppedAt = 0;
      for await (const { layer } of receiver.stream({ requestId: id, ...base() })) {
        expect(layer).toBe(0);
        stoppedAt = now();
        break;
      }
      await expectFreed(settled, stoppedAt, 'reader', 'stopped iterating');
    });

    it('stream(): the loop body throws', async () => {
      const { id, settled } = await publish();
      let stoppedAt = 0;
      const e = await (async () => {
        for await (const _ of receiver.stream({ requestId: id, ...base() })) {
          void _;
          stoppedAt = now();
          throw new Error('decode failed');
        }
      })().then(() => null, (err) => err);
      expect((e as Error).message).toBe('decode failed');
      await expectFreed(settled, stoppedAt);
    });

    it('stream(): aborted by its signal while waiting for a layer', async () => {
      const { id, settled } = await publish({ layersReady: 0 });
      const ac = new AbortController();
      const streaming = (async () => {
        for await (const _ of receiver.stream({ requestId: id, ...base(), signal: ac.signal })) void _;
      })();
      await new Promise((r) => setTimeout(r, 50));
      ac.abort();
      const e = await rejection(streaming);
      const stoppedAt = now();
      expect(e.code).toBe('ERR_CANCELED');
      await expectFreed(settled, stoppedAt);
    });

    it('receiver.close() while a stream waits: the stream rejects ERR_CANCELED and the prefill is told', async () => {
      const a = await Agent.create({ name: 'closing-reader', ucx: { transports } });
      try {
        const r = new KvReceiver(a, layout, a.register(Buffer.alloc(layout.regionBytes), { name: 'kv' }));
        const p = a.loadPeer(Buffer.from(metadata, 'base64'));
        const { id, settled } = await publish({ layersReady: 0 });
        const streaming = (async () => {
          for await (const _ of r.stream({ requestId: id, ...base(), sources: [p] })) void _;
        })();
        await new Promise((res) => setTimeout(res, 50));
        r.close();
        const stoppedAt = now();
        const e = await rejection(streaming);
        expect(e.code).toBe('ERR_CANCELED');
        expect(e.message).toContain('receiver was closed');
        await expectFreed(settled, stoppedAt, 'closing-reader');
      } finally {
        await a.close();
      }
    });

    for (const how of ['exit', 'kill'] as const) {
      // SIGKILL on shared memory is seen only through UCX keepalive (~1 s): bounded, not instant.
      const bound = how === 'kill' && transports.startsWith('shm') ? 3_000 : SETTLE_MS;
      it(`the reader's process ${how === 'exit' ? 'exits (agent left open)' : 'is killed (SIGKILL)'} mid-stream: settled within ${bound} ms`, async () => {
        const reader = new PeerProcess(`reader-${how}`, {}, 'fixtures/kv-reader.cjs');
        try {
          await reader.ok('init', { name: reader.name, layout: layout.spec(), transports, source: metadata });
          const { id, settled } = await publish({ layersReady: 1 });
          const firstLayer = reader.waitEvent('layer', 5_000, (m) => m.req === id);
          await reader.ok('stream', { req: id, sourceLayout: prefillSpec, sourceBlocks: [1, 2], destinationBlocks: [3, 4] });
          await firstLayer; // it is reading: layer 0 landed, it waits for layer 1
          const leaving = reader.waitEvent('leaving');
          void reader.call('leave', { how });
          const { at } = await leaving;
          const s = await settled;
          expect(s).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
          expect(s.message).toContain(`reader '${reader.name}' disconnected`);
          expect(s.at - at).toBeLessThan(bound);
        } finally {
          reader.kill();
        }
      });
    }

    it('two readers: one aborts while the other still reads; the publication waits for it, then names the one that stopped', async () => {
      const b = await Agent.create({ name: 'reader-b', ucx: { transports } });
      try {
        const rb = new KvReceiver(b, layout, b.register(Buffer.alloc(layout.regionBytes), { name: 'kv' }));
        const pb = b.loadPeer(Buffer.from(metadata, 'base64'));
        const { id, settled } = await publish({ readers: 2, layersReady: 0 });
        let aDone = false;
        const ac = new AbortController();
        const a = (async () => {
          for await (const _ of receiver.stream({ requestId: id, ...base(), signal: ac.signal })) void _;
        })().then(() => (aDone = true), () => (aDone = true));
        const layers: number[] = [];
        const bStream = (async () => {
          for await (const { layer } of rb.stream({ requestId: id, ...base(), sources: [pb] })) layers.push(layer);
        })();
        await new Promise((r) => setTimeout(r, 50));
        ac.abort();
        await a;
        expect(aDone).toBe(true);
        let early: any = null;
        void settled.then((s) => (early = s));
        await new Promise((r) => setTimeout(r, 150)); // reader-b is still waiting for layers
        expect(early).toBeNull();
        for (let layer = 0; layer < shape.layers; layer++) await prefill.ok('layer', { req: id, layer });
        await bStream;
        expect(layers).toEqual([0, 1, 2, 3]);
        const s = await settled;
        expect(s).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
        expect(s.message).toContain("reader 'reader' aborted");
        expect(s.message).not.toContain('reader-b');
      } finally {
        await b.close();
      }
    });

    it("the prefill's lease expiring stops a streaming reader with ERR_CANCELED saying so; a late reader is told the request ended", async () => {
      const { id, settled } = await publish({ layersReady: 0, leaseMs: 300 });
      const e = await rejection((async () => {
        for await (const _ of receiver.stream({ requestId: id, ...base() })) void _;
      })());
      expect(e.code).toBe('ERR_CANCELED');
      expect(e.message).toContain('lease of 300 ms expired');
      expect(await settled).toMatchObject({ ok: false, code: 'ERR_TIMEOUT' });
      const late = await rejection((async () => {
        for await (const _ of receiver.stream({ requestId: id, ...base() })) void _;
      })());
      expect(late.code).toBe('ERR_CANCELED');
      expect(late.message).toContain('already ended');
    });
  });
}
