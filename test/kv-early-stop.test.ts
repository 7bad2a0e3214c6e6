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

    it('stream(): its signal aborted while the loop body still runs tells the prefill at once, not when the body returns', async () => {
      const { id, settled } = await publish();
      const ac = new AbortController();
      let abortedAt = 0;
      const e = await rejection((async () => {
        for await (const _ of receiver.stream({ requestId: id, ...base(), signal: ac.signal })) {
          void _;
          ac.abort();
          abortedAt = now();
          await new Promise((r) => setTimeout(r, 1000)); // the body is busy for a second
        }
      })());
      expect(e.code).toBe('ERR_CANCELED');
      const s = await settled;
      expect(s).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
      expect(s.at - abortedAt).toBeLessThan(SETTLE_MS);
    });

    it('pull() with a signal aborted before it starts still tells the prefill', async () => {
      const { id, settled } = await publish();
      const ac = new AbortController();
      ac.abort();
      const e = await rejection(receiver.pull({ requestId: id, ...base(), signal: ac.signal }));
      const stoppedAt = now();
      expect(e.code).toBe('ERR_CANCELED');
      await expectFreed(settled, stoppedAt, 'reader', 'aborted before the pull started');
    });

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

describe('early stops across several prefill ranks, restarts and silent sources', () => {
  const transports = 'shm,self';
  const tp2 = [0, 1].map((rank): KvLayoutSpec => ({ ...shape, blocks: 16, tp: { rank, size: 2 } }));

  it('a stream from two prefill ranks that one rank aborts tells the other rank at once', async () => {
    const ranks = [0, 1].map((r) => new PeerProcess(`prefill-tp-${r}`, {}, 'fixtures/kv-sender.cjs'));
    const agent = await Agent.create({ name: 'reader-tp', ucx: { transports } });
    try {
      const mds = await Promise.all(ranks.map((w, r) => w.ok('init', { name: w.name, layout: tp2[r], transports, fill: true })));
      const layout = new KvLayout({ ...shape, blocks: 8 });
      const receiver = new KvReceiver(agent, layout, agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' }));
      const sources = mds.map((m) => agent.loadPeer(Buffer.from(m.metadata, 'base64')));
      const settled = ranks.map((w) => w.waitEvent('settled', LEASE, (m) => m.req === 'tp'));
      for (const w of ranks) await w.ok('publish', { req: 'tp', blocks: [1, 2], readers: 1, leaseMs: LEASE, layersReady: 0 });
      const streaming = (async () => {
        for await (const _ of receiver.stream({ requestId: 'tp', sources, sourceLayout: new KvLayout(tp2[0]), sourceBlocks: [1, 2], destinationBlocks: [3, 4] })) void _;
      })().then(() => null, (e) => e);
      await new Promise((r) => setTimeout(r, 50));
      const abortedAt = now();
      await ranks[0].ok('abort', { req: 'tp', reason: 'rank 0 gave up' });
      expect(await streaming).toMatchObject({ code: 'ERR_CANCELED', message: expect.stringContaining('rank 0 gave up') });
      const other = await settled[1];
      expect(other).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
      expect(other.message).toContain("reader 'reader-tp' aborted");
      expect(other.at - abortedAt).toBeLessThan(SETTLE_MS + 50); // includes the IPC round trip of the abort command
      expect(await settled[0]).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
    } finally {
      await agent.close();
      for (const w of ranks) await w.close();
    }
  });

  it('a staged pull whose source never answers ends at its deadline (ERR_TIMEOUT), not never', async () => {
    const nhd = { ...shape, blockLayout: 'NHD' as const };
    const spec: KvLayoutSpec = { ...nhd, blocks: 16 };
    const prefill = new PeerProcess('prefill-silent', {}, 'fixtures/kv-sender.cjs');
    const agent = await Agent.create({ name: 'reader-staged', ucx: { transports } });
    try {
      const { metadata } = await prefill.ok('init', { name: prefill.name, layout: spec, transports, fill: true, stagingBytes: 1 << 20 });
      await prefill.ok('publish', { req: 'silent', blocks: [1], readers: 1, leaseMs: LEASE });
      await prefill.ok('closeSender'); // its agent is up, its KvSender answers nothing any more
      const layout = new KvLayout({ ...nhd, blocks: 8, tp: { rank: 0, size: 2 } });
      const receiver = new KvReceiver(agent, layout, agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' }));
      const source = agent.loadPeer(Buffer.from(metadata, 'base64'));
      const started = Date.now();
      const e = await receiver.pull({ requestId: 'silent', sources: [source], sourceLayout: new KvLayout(spec), sourceBlocks: [1], destinationBlocks: [0], deadlineMs: 300 })
        .then(() => null, (err) => err);
      expect(e).toMatchObject({ code: 'ERR_TIMEOUT', message: expect.stringContaining('did not answer the staging request in 300 ms') });
      expect(Date.now() - started).toBeLessThan(2000);
    } finally {
      await agent.close();
      await prefill.close();
    }
  });

  it("a reader killed and restarted under the same name: the old instance's late disconnect does not cancel the new one's publication", async () => {
    const prefill = new PeerProcess('prefill-restart', {}, 'fixtures/kv-sender.cjs');
    const readers: PeerProcess[] = [];
    try {
      const { metadata } = await prefill.ok('init', { name: prefill.name, layout: prefillSpec, transports, fill: true });
      const layout = new KvLayout({ ...shape, blocks: 8 });
      const streamArgs = { sourceLayout: prefillSpec, sourceBlocks: [1, 2], destinationBlocks: [3, 4] };
      const first = new PeerProcess('decode-x', {}, 'fixtures/kv-reader.cjs');
      readers.push(first);
      await first.ok('init', { name: 'decode-x', layout: layout.spec(), transports, source: metadata });
      const oldSettled = prefill.waitEvent('settled', LEASE, (m) => m.req === 'old');
      await prefill.ok('publish', { req: 'old', blocks: [1, 2], readers: 1, leaseMs: LEASE, layersReady: 0 });
      await first.ok('stream', { req: 'old', ...streamArgs });
      await new Promise((r) => setTimeout(r, 50));
      first.kill(); // on shared memory the prefill hears of it only through keepalive, ~1 s later
      const second = new PeerProcess('decode-x', {}, 'fixtures/kv-reader.cjs');
      readers.push(second);
      await second.ok('init', { name: 'decode-x', layout: layout.spec(), transports, source: metadata });
      const newSettled = prefill.waitEvent('settled', LEASE, (m) => m.req === 'new');
      await prefill.ok('publish', { req: 'new', blocks: [1, 2], readers: 1, leaseMs: LEASE, layersReady: 0 });
      const streamed = second.waitEvent('streamed', LEASE, (m) => m.req === 'new');
      await second.ok('stream', { req: 'new', ...streamArgs });
      // The old instance's publication ends when its death is seen; the new one must not.
      expect(await oldSettled).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
      await new Promise((r) => setTimeout(r, 1500));
      let early: any = null;
      void newSettled.then((s) => (early = s));
      await new Promise((r) => setTimeout(r, 10));
      expect(early).toBeNull();
      for (let layer = 0; layer < shape.layers; layer++) await prefill.ok('layer', { req: 'new', layer });
      expect(await streamed).toMatchObject({ ok: true });
      expect(await newSettled).toMatchObject({ ok: true, readers: ['decode-x'] });
    } finally {
      for (const r of readers) r.kill();
      await prefill.close();
    }
  });
});
