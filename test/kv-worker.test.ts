// KvSender / KvReceiver between real processes: pull + done, two readers with TP 2, layer streaming,
// lease expiry, and abort in both directions.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvLayout, KvReceiver, type KvLayoutSpec, type Peer } from '../lib';
import { PeerProcess } from './helpers';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const { forEachByte, value } = require('./fixtures/kv-fill.cjs');

const shape = { modelId: 'tiny', layers: 4, tokensPerBlock: 8, kvHeads: 4, headDim: 16, dtypeBytes: 2 };
const prefillSpec: KvLayoutSpec = { ...shape, blocks: 16, tp: { rank: 0, size: 1 } };
const transports = 'shm,self';

describe('KvSender / KvReceiver', () => {
  let prefill: PeerProcess;
  const decoders: { agent: Agent; receiver: KvReceiver; layout: KvLayout; peer: Peer; pool: Uint8Array }[] = [];

  beforeAll(async () => {
    prefill = new PeerProcess('prefill-0', {}, 'fixtures/kv-sender.cjs');
    const { metadata } = await prefill.ok('init', { name: 'prefill-0', layout: prefillSpec, transports, fill: false });
    for (let rank = 0; rank < 2; rank++) {
      const layout = new KvLayout({ ...shape, blocks: 12, tp: { rank, size: 2 } });
      const agent = await Agent.create({ name: `decode-${rank}`, ucx: { transports } });
      const region = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
      decoders.push({ agent, receiver: new KvReceiver(agent, layout, region), layout, peer: agent.loadPeer(Buffer.from(metadata, 'base64')), pool: region.bytes });
    }
  });
  afterAll(async () => {
    for (const d of decoders) await d.agent.close();
    prefill.child.send({ cmd: 'exit' });
  });

  function wrongBytes(d: (typeof decoders)[number], from: number[], to: number[], layers?: [number, number]): number {
    let wrong = 0;
    forEachByte(d.layout, to, (at: number, layer: number, kv: number, j: number, t: number, h: number, x: number, b: number) => {
      if (d.pool[at] !== value(layer, kv, from[j], t, h, x, b)) wrong++;
    }, layers);
    return wrong;
  }

  it('layer streaming: each decode rank gets layer i, verified, before layer i+1 is computed', async () => {
    const from = [1, 2, 3, 9];
    const to = [0, 1, 2, 5];
    await prefill.ok('publish', { req: 'r1', blocks: from, readers: 2, leaseMs: 20_000, layersReady: 0 });
    const settled = prefill.waitEvent('settled', 20_000, (m) => m.req === 'r1');
    const order: string[] = [];
    const streams = decoders.map(async (d, rank) => {
      for await (const { layer } of d.receiver.stream({ requestId: 'r1', sources: [d.peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: from, destinationBlocks: to })) {
        order.push(`got ${rank}:${layer}`);
        // This layer is complete; the next one has not been computed yet, so it is still zero here.
        expect(wrongBytes(d, from, to, [layer, layer + 1])).toBe(0);
        if (layer + 1 < shape.layers) expect(wrongBytes(d, from, to, [layer + 1, layer + 2])).toBeGreaterThan(0);
      }
    });
    await new Promise((r) => setTimeout(r, 100)); // let both readers subscribe
    for (let layer = 0; layer < shape.layers; layer++) {
      order.push(`compute ${layer}`);
      await prefill.ok('layer', { req: 'r1', layer });
      await new Promise((r) => setTimeout(r, 60));
    }
    await Promise.all(streams);
    const result = await settled;
    expect(result.ok).toBe(true);
    expect([...result.readers].sort()).toEqual(['decode-0', 'decode-1']);
    for (let layer = 0; layer < shape.layers; layer++)
      for (const rank of [0, 1]) expect(order.indexOf(`got ${rank}:${layer}`)).toBeGreaterThan(order.indexOf(`compute ${layer}`));
  });

  it('pull() of a fully computed request, then done frees it on the prefill side', async () => {
    const from = [4, 5, 6, 7];
    const to = [8, 9, 10, 11];
    await prefill.ok('publish', { req: 'r2', blocks: from, readers: 1, leaseMs: 20_000, layersReady: 0 });
    for (let layer = 0; layer < shape.layers; layer++) await prefill.ok('layer', { req: 'r2', layer }); // compute it all
    const settled = prefill.waitEvent('settled', 10_000, (m) => m.req === 'r2');
    const d = decoders[1];
    const r = await d.receiver.pull({ requestId: 'r2', sources: [d.peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: from, destinationBlocks: to });
    expect(r.bytes).toBe(shape.layers * 2 * from.length * d.layout.blockBytes);
    expect(wrongBytes(d, from, to)).toBe(0);
    expect(await settled).toMatchObject({ ok: true, readers: ['decode-1'] });
  });

  it("a reader's done that overtakes the publish (it heard of the request elsewhere) still frees it", async () => {
    const from = [12, 13];
    const d = decoders[1];
    await d.receiver.pull({ requestId: 'r6', sources: [d.peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: from, destinationBlocks: [0, 1] });
    await new Promise((r) => setTimeout(r, 200)); // the done is at the prefill before its publish
    const settled = prefill.waitEvent('settled', 5_000, (m) => m.req === 'r6');
    await prefill.ok('publish', { req: 'r6', blocks: from, readers: 1, leaseMs: 20_000 });
    expect(await settled).toMatchObject({ ok: true, readers: ['decode-1'] });
  });

  it('a lease with no reader expires with ERR_TIMEOUT', async () => {
    const settled = prefill.waitEvent('settled', 10_000, (m) => m.req === 'r3');
    await prefill.ok('publish', { req: 'r3', blocks: [0], readers: 1, leaseMs: 200 });
    expect(await settled).toMatchObject({ ok: false, code: 'ERR_TIMEOUT' });
  });

  it('prefill abort stops a streaming reader; a reader abort cancels the publication', async () => {
    const d = decoders[0];
    const rq = { sources: [d.peer], sourceLayout: new KvLayout(prefillSpec), sourceBlocks: [1], destinationBlocks: [3] };
    await prefill.ok('publish', { req: 'r4', blocks: [1], readers: 1, leaseMs: 20_000, layersReady: 0 });
    const settled4 = prefill.waitEvent('settled', 10_000, (m) => m.req === 'r4');
    const stream = (async () => {
      for await (const _ of d.receiver.stream({ requestId: 'r4', ...rq })) void _;
    })().then(() => null, (e) => e);
    await new Promise((r) => setTimeout(r, 100));
    await prefill.ok('abort', { req: 'r4', reason: 'prompt canceled' });
    expect(await stream).toMatchObject({ code: 'ERR_CANCELED', message: expect.stringContaining('prompt canceled') });
    expect(await settled4).toMatchObject({ ok: false, code: 'ERR_CANCELED' });

    await prefill.ok('publish', { req: 'r5', blocks: [1], readers: 1, leaseMs: 20_000, layersReady: 0 });
    const settled5 = prefill.waitEvent('settled', 10_000, (m) => m.req === 'r5');
    const ac = new AbortController();
    const stream5 = (async () => {
      for await (const _ of d.receiver.stream({ requestId: 'r5', ...rq, signal: ac.signal })) void _;
    })().then(() => null, (e) => e);
    await new Promise((r) => setTimeout(r, 100));
    ac.abort();
    expect(await stream5).toMatchObject({ code: 'ERR_CANCELED' });
    const s5 = await settled5;
    expect(s5).toMatchObject({ ok: false, code: 'ERR_CANCELED' });
    expect(s5.message).toContain("reader 'decode-0' aborted");
  });
});

describe('staging for NHD blocks across TP', () => {
  for (const staging of [true, false]) {
    it(`TP 1 -> 2 with NHD blocks ${staging ? 'through the staging region (one run per source)' : 'without staging (one run per token)'}`, async () => {
      const nhd = { ...shape, blockLayout: 'NHD' as const };
      const spec: KvLayoutSpec = { ...nhd, blocks: 16, tp: { rank: 0, size: 1 } };
      const prefill = new PeerProcess(`prefill-nhd-${staging}`, {}, 'fixtures/kv-sender.cjs');
      const agents: Agent[] = [];
      try {
        const { metadata } = await prefill.ok('init', { name: prefill.name, layout: spec, transports, fill: true, stagingBytes: staging ? 1 << 20 : 0 });
        const from = [1, 4, 5, 12];
        const to = [0, 2, 3, 7];
        await prefill.ok('publish', { req: 'nhd', blocks: from, readers: 2, leaseMs: 20_000 });
        const settled = prefill.waitEvent('settled', 10_000, (m) => m.req === 'nhd');
        for (let rank = 0; rank < 2; rank++) {
          const layout = new KvLayout({ ...nhd, blocks: 8, tp: { rank, size: 2 } });
          const agent = await Agent.create({ name: `nhd-decode-${rank}`, ucx: { transports } });
          agents.push(agent);
          const region = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
          const receiver = new KvReceiver(agent, layout, region);
          const peer = agent.loadPeer(Buffer.from(metadata, 'base64'));
          const r = await receiver.pull({ requestId: 'nhd', sources: [peer], sourceLayout: new KvLayout(spec), sourceBlocks: from, destinationBlocks: to });
          expect(r.bytes).toBe(shape.layers * 2 * from.length * layout.blockBytes);
          // Staged: one contiguous run; unstaged: one run per token (no two are adjacent on both sides).
          expect(r.stats[0].segments).toBe(staging ? 1 : shape.layers * 2 * from.length * shape.tokensPerBlock);
          let wrong = 0;
          forEachByte(layout, to, (at: number, layer: number, kv: number, j: number, t: number, h: number, x: number, b: number) => {
            if (region.bytes[at] !== value(layer, kv, from[j], t, h, x, b)) wrong++;
          });
          expect(wrong).toBe(0);
        }
        expect(await settled).toMatchObject({ ok: true });
      } finally {
        for (const a of agents) await a.close();
        prefill.child.send({ cmd: 'exit' });
      }
    });
  }
});
