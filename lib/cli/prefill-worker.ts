// A prefill rank of `kvwire demo`: allocates and fills its KV pool, then publishes each request's
// blocks as the orchestrator asks, and reports when every reader is done (the blocks may be reused).
import { Agent } from '../agent';
import { KvLayout, type KvLayoutSpec } from '../kv/layout';
import { KvSender } from '../kv/worker';
import { fillPool } from './kv-content';

type Msg =
  | { cmd: 'init'; name: string; layout: KvLayoutSpec; transports: string; secret: string; memory: 'dram' | 'vram' }
  | { cmd: 'publish'; req: string; blocks: number[]; readers: number }
  | { cmd: 'exit' };

let agent: Agent;
let sender: KvSender;

// The demo's orchestrator went away (killed, Ctrl-C): do not linger.
process.on('disconnect', () => process.exit(0));

process.on('message', async (m: Msg) => {
  if (m.cmd === 'init') {
    const layout = new KvLayout(m.layout);
    agent = await Agent.create({ name: m.name, secret: Buffer.from(m.secret, 'base64'), ucx: { transports: m.transports } });
    if (m.memory === 'vram') {
      // The KV cache in GPU memory, filled from the host (as a model's prefill would have written it).
      const pool = agent.allocate(layout.regionBytes, { name: 'kv', access: 'read', memory: 'vram' });
      const staged = Buffer.alloc(layout.regionBytes);
      fillPool(layout, staged);
      pool.write(0, staged);
      sender = new KvSender(agent, layout, pool);
      process.send!({ t: 'ready', metadata: Buffer.from(agent.metadata()).toString('base64') });
      return;
    }
    const pool = agent.allocate(layout.regionBytes, { name: 'kv', access: 'read' });
    fillPool(layout, pool.bytes);
    sender = new KvSender(agent, layout, pool);
    process.send!({ t: 'ready', metadata: Buffer.from(agent.metadata()).toString('base64') });
  } else if (m.cmd === 'publish') {
    sender.publish(m.req, m.blocks, { readers: m.readers, leaseMs: 30_000 }).then(
      () => process.send!({ t: 'freed', req: m.req }),
      (e) => process.send!({ t: 'freed', req: m.req, error: `${e.code}: ${e.message}` }),
    );
  } else if (m.cmd === 'exit') {
    await agent?.close();
    process.exit(0);
  }
});
