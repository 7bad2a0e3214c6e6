// The prefill side of `kvwire demo`: allocates its KV pool, fills every block deterministically,
// publishes its metadata and serves reads until told to exit.
import { Agent } from '../agent';
import { fillBlock } from './demo';

process.once('message', async (m: { transports: string; blocks: number; blockBytes: number }) => {
  const agent = await Agent.create({ name: 'prefill-0', ucx: { transports: m.transports } });
  const pool = agent.allocate(m.blocks * m.blockBytes, { name: 'kv', access: 'read' });
  for (let b = 0; b < m.blocks; b++) fillBlock(pool.bytes.subarray(b * m.blockBytes, (b + 1) * m.blockBytes), b);
  process.on('message', async (msg: { exit?: boolean }) => {
    if (msg.exit) {
      await agent.close();
      process.exit(0);
    }
  });
  process.send!({ metadata: Buffer.from(agent.metadata()).toString('base64') });
});
