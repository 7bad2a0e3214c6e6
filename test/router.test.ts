// The router transport plugin across three processes: the router (this process) asks a decode
// worker to pull a request's blocks from a prefill worker; bytes go worker to worker.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvLayout, KvwireRouterTransport, type KvLayoutSpec } from '../lib';
import { PeerProcess } from './helpers';

const shape = { modelId: 'tiny', layers: 4, tokensPerBlock: 8, kvHeads: 4, headDim: 16, dtypeBytes: 2 };
const prefillLayout: KvLayoutSpec = { ...shape, blocks: 16 };
const decodeLayout: KvLayoutSpec = { ...shape, blocks: 12 };
const transports = 'shm,self';

describe('KvwireRouterTransport', () => {
  let router: Agent;
  let transport: KvwireRouterTransport;
  let prefill: PeerProcess;
  let decode: PeerProcess;

  beforeAll(async () => {
    prefill = new PeerProcess('prefill-r', {}, 'fixtures/kv-sender.cjs');
    decode = new PeerProcess('decode-r', {}, 'fixtures/kv-decode.cjs');
    const [p, d] = await Promise.all([
      prefill.ok('init', { name: 'prefill-r', layout: prefillLayout, transports, fill: true }),
      decode.ok('init', { name: 'decode-r', layout: decodeLayout, transports }),
    ]);
    router = await Agent.create({ name: 'router', ucx: { transports } });
    transport = new KvwireRouterTransport(router, 2);
    transport.addWorker({ metadata: Buffer.from(p.metadata, 'base64'), layout: prefillLayout });
    transport.addWorker({ metadata: Buffer.from(d.metadata, 'base64'), layout: decodeLayout });
  });
  afterAll(async () => {
    await transport.close();
    await router.close();
    for (const w of [prefill, decode]) if (w.child.connected) w.child.send({ cmd: 'exit' });
  });

  it('moves blocks worker to worker, verified at the destination, and learns the pair bandwidth', async () => {
    const blockBytes = 8 * 4 * 16 * 2;
    expect(transport.estimate(1e9, 'prefill-r', 'decode-r')).toBeCloseTo(0.5); // default 2 GB/s before any move
    const from = [2, 3, 4, 11];
    const to = [0, 1, 2, 9];
    const r = await transport.move({ requestId: 'req-1', from: 'prefill-r', to: 'decode-r', sourceBlocks: from, destinationBlocks: to });
    expect(r.bytes).toBe(shape.layers * 2 * from.length * blockBytes);
    expect(r.totalUs).toBeGreaterThanOrEqual(r.transferUs);
    expect((await decode.ok('verify', { from, to })).wrong).toBe(0);
    const s = transport.stats()['prefill-r->decode-r'];
    expect(s).toMatchObject({ moves: 1, failures: 0, bytes: r.bytes });
    expect(s.gbps).toBeGreaterThan(0);
    expect(transport.estimate(1e9, 'prefill-r', 'decode-r')).toBeCloseTo(1 / s.gbps);
    expect(transport.health()).toMatchObject({ 'prefill-r': { connected: true }, 'decode-r': { connected: true } });
  });

  it('reports bad requests with their codes', async () => {
    await expect(transport.move({ requestId: 'x', from: 'nobody', to: 'decode-r', sourceBlocks: [0], destinationBlocks: [0] })).rejects.toMatchObject({ code: 'ERR_NOT_FOUND' });
    // The destination refuses a block it does not have; the router hears why.
    await expect(transport.move({ requestId: 'y', from: 'prefill-r', to: 'decode-r', sourceBlocks: [0], destinationBlocks: [99] })).rejects.toMatchObject({
      code: 'ERR_INVALID_PARAM',
      message: expect.stringContaining('destinationBlocks[0] = 99'),
    });
    expect(transport.stats()['prefill-r->decode-r'].failures).toBe(1);
  });

  it('routes a source with TP 2 to a TP 1 destination (each source rank gives its heads)', async () => {
    const ranks = [0, 1].map((r) => new PeerProcess(`prefill-tp${r}`, {}, 'fixtures/kv-sender.cjs'));
    try {
      const specs = [0, 1].map((rank): KvLayoutSpec => ({ ...shape, blocks: 16, tp: { rank, size: 2 } }));
      const mds = await Promise.all(ranks.map((w, r) => w.ok('init', { name: w.name, layout: specs[r], transports, fill: true })));
      // A worker's KvLayout is accepted as well as its spec (the TP rank travels with either).
      mds.forEach((m, r) => transport.addWorker({ metadata: Buffer.from(m.metadata, 'base64'), layout: r === 0 ? new KvLayout(specs[r]) : specs[r] }));
      await expect(transport.move({ requestId: 'wrong-order', from: ['prefill-tp1', 'prefill-tp0'], to: 'decode-r', sourceBlocks: [0], destinationBlocks: [0] }))
        .rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
      const from = [5, 6];
      const to = [3, 4];
      const r = await transport.move({ requestId: 'tp2', from: ['prefill-tp0', 'prefill-tp1'], to: 'decode-r', sourceBlocks: from, destinationBlocks: to });
      expect(r.bytes).toBe(shape.layers * 2 * from.length * 8 * 4 * 16 * 2);
      expect((await decode.ok('verify', { from, to })).wrong).toBe(0);
      expect(transport.stats()['prefill-tp0+prefill-tp1->decode-r'].moves).toBe(1);
    } finally {
      for (const w of ranks) w.child.send({ cmd: 'exit' });
    }
  });

  it('a dead destination fails the move and shows in health', async () => {
    decode.kill();
    // shm: UCX keepalive notices in ~1 s; health says so as soon as it does.
    for (let waited = 0; transport.health()['decode-r'].connected && waited < 3000; waited += 50) await new Promise((r) => setTimeout(r, 50));
    expect(transport.health()['decode-r']).toMatchObject({ connected: false, lastError: expect.stringContaining('disconnected') });
    const t0 = Date.now();
    const err = await transport.move({ requestId: 'z', from: 'prefill-r', to: 'decode-r', sourceBlocks: [0], destinationBlocks: [0], deadlineMs: 1000 }).catch((e) => e);
    // Either UCX already saw the peer die, or the move times out: it never hangs.
    expect(['ERR_REMOTE_DISCONNECT', 'ERR_TIMEOUT']).toContain(err.code);
    expect(Date.now() - t0).toBeLessThan(2500);
    expect(transport.stats()['prefill-r->decode-r'].failures).toBe(2);
    expect(transport.health()['decode-r'].connected).toBe(false);
    // addWorker with the worker's metadata again is how a router says it is back; a later
    // disconnect shows again.
  });

  it('a move whose destination disconnects while it runs fails at once with ERR_REMOTE_DISCONNECT', async () => {
    const d2 = new PeerProcess('decode-r2', {}, 'fixtures/kv-decode.cjs');
    const { metadata } = await d2.ok('init', { name: 'decode-r2', layout: decodeLayout, transports });
    transport.addWorker({ metadata: Buffer.from(metadata, 'base64'), layout: new KvLayout(decodeLayout) });
    // One move first: both directions of the connection are up (a worker that never answered its
    // router's HELLO cannot say goodbye on it).
    await transport.move({ requestId: 'warm', from: 'prefill-r', to: 'decode-r2', sourceBlocks: [2], destinationBlocks: [0] });
    const stalling = d2.waitEvent('stalling');
    void d2.call('stallThenExit', { ms: 500 });
    await stalling; // from here the destination answers nothing, then exits
    const t0 = Date.now();
    const err = await transport.move({ requestId: 'gone', from: 'prefill-r', to: 'decode-r2', sourceBlocks: [2, 3], destinationBlocks: [0, 1], deadlineMs: 10_000 }).catch((e) => e);
    expect(err.code).toBe('ERR_REMOTE_DISCONNECT');
    expect(err.message).toContain('decode-r2');
    expect(err.message).toContain('it closed'); // its goodbye, not UCX keepalive
    expect(Date.now() - t0).toBeLessThan(2000); // the 500 ms stall, then the goodbye: not the 11 s deadline
    expect(transport.health()['decode-r2'].connected).toBe(false);
    expect(transport.health()['prefill-r'].connected).toBe(true);
  });
});
