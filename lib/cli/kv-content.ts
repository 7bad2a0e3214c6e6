// Deterministic KV contents for the demo: every (layer, K/V, block, global head) run of a block
// holds words derived from those coordinates, so a decode worker can verify every byte it pulled
// whatever the two sides' tensor parallelism.
import type { KvLayout } from '../kv/layout';

function seedOf(layer: number, kv: number, block: number, head: number): number {
  let h = 2166136261;
  for (const c of [layer, kv, block, head]) h = Math.imul(h ^ c, 16777619) >>> 0;
  return h || 1;
}

/** Fills (or, with `check`, counts mismatching bytes of) one head run: 32-bit xorshift words. */
function run(bytes: Uint8Array, offset: number, length: number, seed: number, check: boolean): number {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset + offset, length >>> 2);
  let x = seed;
  let wrong = 0;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    if (!check) words[i] = x >>> 0;
    else if (words[i] !== x >>> 0) wrong += 4;
  }
  return wrong;
}

// HND blocks: head h's run is tokensPerBlock x headDim x dtype bytes at h * run inside the block.
function visit(l: KvLayout, blocks: ArrayLike<number>, srcBlocks: ArrayLike<number>, mem: Uint8Array, check: boolean): number {
  if (l.blockLayout !== 'HND') throw new Error('the demo uses HND blocks');
  const runBytes = l.tokensPerBlock * l.headDim * l.dtypeBytes;
  let wrong = 0;
  for (let layer = 0; layer < l.layers; layer++)
    for (const kv of [0, 1] as const)
      for (let j = 0; j < blocks.length; j++)
        for (let h = 0; h < l.localHeads; h++)
          wrong += run(mem, l.offsetOf(layer, kv, blocks[j]) + h * runBytes, runBytes, seedOf(layer, kv, srcBlocks[j], l.firstHead + h), check);
  return wrong;
}

/** Prefill: writes every block of the pool. */
export function fillPool(l: KvLayout, mem: Uint8Array): void {
  const all = Array.from({ length: l.blocks }, (_, i) => i);
  visit(l, all, all, mem, false);
}

/** Decode: bytes of `blocks` that differ from what prefill's `sourceBlocks` hold. */
export function countWrongBytes(l: KvLayout, mem: Uint8Array, blocks: ArrayLike<number>, sourceBlocks: ArrayLike<number>): number {
  return visit(l, blocks, sourceBlocks, mem, true);
}
