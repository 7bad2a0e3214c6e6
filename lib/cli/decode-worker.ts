// A decode rank of `kvwire demo`: pulls each request's KV from the prefill ranks into its own
// blocks, verifies every byte, and reports the figures.
import { Agent } from '../agent';
import { KvLayout, type KvLayoutSpec } from '../kv/layout';
import type { Peer, Region } from '../memory';
import { KvReceiver } from '../kv/worker';
import { countWrongBytes } from './kv-content';

type Msg =
  | { cmd: 'init'; name: string; layout: KvLayoutSpec; prefillLayout: KvLayoutSpec; prefills: string[]; transports: string; secret: string; memory: 'dram' | 'vram' }
  | { cmd: 'pull'; req: string; sourceBlocks: number[]; destinationBlocks: number[] }
  | { cmd: 'exit' };

let agent: Agent;
let layout: KvLayout;
let prefillLayout: KvLayout;
let receiver: KvReceiver;
let sources: Peer[];
let pool: Uint8Array;
let vram: Region | undefined; // a VRAM pool: its blocks are copied into `pool` (a host mirror) to verify

// The demo's orchestrator went away (killed, Ctrl-C): do not linger.
process.on('disconnect', () => process.exit(0));

process.on('message', async (m: Msg) => {
  if (m.cmd === 'init') {
    layout = new KvLayout(m.layout);
    prefillLayout = new KvLayout(m.prefillLayout);
    layout.assertCompatible(prefillLayout);
    agent = await Agent.create({ name: m.name, secret: Buffer.from(m.secret, 'base64'), ucx: { transports: m.transports } });
    const region = agent.allocate(layout.regionBytes, m.memory === 'vram' ? { name: 'kv', memory: 'vram' } : { name: 'kv' });
    if (m.memory === 'vram') {
      vram = region;
      pool = new Uint8Array(layout.regionBytes);
    } else {
      pool = region.bytes;
    }
    receiver = new KvReceiver(agent, layout, region);
    sources = m.prefills.map((md) => agent.loadPeer(Buffer.from(md, 'base64')));
    process.send!({ t: 'ready' });
  } else if (m.cmd === 'pull') {
    const started = process.hrtime.bigint();
    try {
      const r = await receiver.pull({
        requestId: m.req,
        sources,
        sourceLayout: prefillLayout,
        sourceBlocks: m.sourceBlocks,
        destinationBlocks: m.destinationBlocks,
        deadlineMs: 20_000,
      });
      const transferUs = Number(process.hrtime.bigint() - started) / 1e3;
      if (vram) {
        // Every byte checked on the host: the pulled blocks copied out of GPU memory first.
        const { offsets, lengths } = layout.descriptorsFor(m.destinationBlocks);
        for (let i = 0; i < offsets.length; i++) pool.set(vram.read(offsets[i], lengths[i]), offsets[i]);
      }
      const wrong = countWrongBytes(layout, pool, m.destinationBlocks, m.sourceBlocks);
      process.send!({ t: 'pulled', req: m.req, bytes: r.bytes, transferUs, wrong });
    } catch (e) {
      process.send!({ t: 'pulled', req: m.req, bytes: 0, transferUs: 0, wrong: -1, error: `${(e as { code?: string }).code}: ${(e as Error).message}` });
    }
  } else if (m.cmd === 'exit') {
    await agent?.close();
    process.exit(0);
  }
});
