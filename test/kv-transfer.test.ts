// End to end: decode ranks pull a request's KV blocks from prefill ranks in other processes over
// real UCX, with different tensor parallelism on each side, and every byte is checked.
import { fork, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Agent, KvLayout, type KvLayoutSpec } from '../lib';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const { forEachByte, value } = require('./fixtures/kv-fill.cjs');

const shape = { modelId: 'tiny-llama', layers: 4, tokensPerBlock: 16, kvHeads: 8, headDim: 16, dtypeBytes: 2 };

async function startPrefill(layout: KvLayoutSpec, transports: string) {
  const child: ChildProcess = fork(path.join(__dirname, 'fixtures', 'kv-prefill.cjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const reply = await new Promise<{ metadata: string; hash: string }>((resolve, reject) => {
    child.once('message', resolve as (m: unknown) => void);
    child.once('exit', (code) => reject(new Error(`prefill exited with ${code}`)));
    child.send({ layout, transports });
  });
  return { child, ...reply };
}

for (const [p, d] of [
  [1, 2],
  [2, 1],
  [2, 4],
]) {
  for (const blockLayout of ['HND', 'NHD'] as const) {
    it(`TP ${p} -> ${d} (${blockLayout}): each decode rank pulls exactly its heads, every byte verified`, async () => {
      const transports = 'shm,self';
      const prefillSpec = (rank: number): KvLayoutSpec => ({ ...shape, blockLayout, blocks: 32, tp: { rank, size: p } });
      const prefills = await Promise.all(Array.from({ length: p }, (_, rank) => startPrefill(prefillSpec(rank), transports)));
      const from = [3, 4, 5, 9, 17, 30];
      const to = [0, 1, 2, 7, 8, 20];
      try {
        for (let rank = 0; rank < d; rank++) {
          const layout = new KvLayout({ ...shape, blockLayout, blocks: 24, tp: { rank, size: d } });
          for (const pf of prefills) expect(pf.hash).toBe(layout.compatibilityHash);
          const agent = await Agent.create({ name: `decode-${rank}`, ucx: { transports } });
          const pool = agent.register(Buffer.alloc(layout.regionBytes), { name: 'kv' });
          const peers = prefills.map((pf) => agent.loadPeer(Buffer.from(pf.metadata, 'base64')));
          const plans = layout.planPull(new KvLayout(prefillSpec(0)), from, to);
          const stats = await Promise.all(
            plans.map((plan) =>
              agent.read(
                pool.descriptors(plan.destinationOffsets, plan.lengths),
                peers[plan.sourceRank].region('kv').descriptors(plan.sourceOffsets, plan.lengths),
              ),
            ),
          );
          expect(stats.reduce((a, s) => a + s.bytes, 0)).toBe(shape.layers * 2 * from.length * layout.blockBytes);
          let wrong = 0;
          forEachByte(layout, to, (at: number, layer: number, kv: number, j: number, t: number, h: number, x: number, b: number) => {
            if (pool.bytes[at] !== value(layer, kv, from[j], t, h, x, b)) wrong++;
          });
          expect(wrong).toBe(0);
          await agent.close();
        }
      } finally {
        for (const pf of prefills) pf.child.send('exit');
      }
    });
  }
}
