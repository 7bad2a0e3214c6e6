// KvLayout math: random shapes and TP pairs, every destination byte written exactly once with the
// right source byte; coalescing; compatibility checks.
import { describe, expect, it } from 'vitest';
import { KvLayout, KvwireError, type KvLayoutSpec } from '../lib';
import { rng } from './helpers';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const { innerOffset, value, fill: fillInto } = require('./fixtures/kv-fill.cjs');
const fill = (l: KvLayout) => fillInto(l, new Uint8Array(l.regionBytes)) as Uint8Array;

const DIVISORS: Record<number, number[]> = { 1: [1], 2: [1, 2], 4: [1, 2, 4], 8: [1, 2, 4, 8] };

describe('KvLayout', () => {
  it('property: heterogeneous TP pulls cover every destination byte exactly once, with the right bytes', () => {
    const next = rng(2024);
    const pick = <T,>(xs: readonly T[]) => xs[next() % xs.length];
    let cases = 0;
    for (let trial = 0; trial < 120; trial++) {
      const kvHeads = pick([1, 2, 4, 8]);
      const shape: Omit<KvLayoutSpec, 'blocks' | 'tp'> = {
        modelId: 'm',
        layers: 1 + (next() % 3),
        tokensPerBlock: 1 + (next() % 4),
        kvHeads,
        headDim: 1 + (next() % 3),
        dtypeBytes: pick([1, 2]),
        arrangement: pick(['separate', 'joint'] as const),
        order: pick(['layer-major', 'block-major'] as const),
        blockLayout: pick(['HND', 'NHD'] as const),
      };
      const p = pick(DIVISORS[kvHeads]);
      const d = pick(DIVISORS[kvHeads]);
      const srcBlocks = 3 + (next() % 4);
      const dstBlocks = 3 + (next() % 4);
      const prefill = Array.from({ length: p }, (_, rank) => new KvLayout({ ...shape, blocks: srcBlocks, tp: { rank, size: p } }));
      const memories = prefill.map(fill);
      const n = 1 + (next() % Math.min(srcBlocks, dstBlocks));
      const from = Array.from({ length: srcBlocks }, (_, i) => i).sort(() => (next() % 3) - 1).slice(0, n);
      const to = Array.from({ length: dstBlocks }, (_, i) => i).sort(() => (next() % 3) - 1).slice(0, n);
      for (let rank = 0; rank < d; rank++) {
        const decode = new KvLayout({ ...shape, blocks: dstBlocks, tp: { rank, size: d } });
        const dst = new Uint8Array(decode.regionBytes);
        const writes = new Uint8Array(decode.regionBytes);
        const plans = decode.planPull(prefill[0], from, to);
        for (const plan of plans) {
          const src = memories[plan.sourceRank];
          for (let i = 0; i < plan.lengths.length; i++) {
            expect(plan.sourceOffsets[i] + plan.lengths[i]).toBeLessThanOrEqual(src.length);
            for (let k = 0; k < plan.lengths[i]; k++) {
              dst[plan.destinationOffsets[i] + k] = src[plan.sourceOffsets[i] + k];
              writes[plan.destinationOffsets[i] + k]++;
            }
          }
        }
        // Sources are exactly the prefill ranks holding our heads.
        const expectedRanks = [...new Set(Array.from({ length: decode.localHeads }, (_, h) => Math.floor((decode.firstHead + h) / (kvHeads / p))))];
        expect(plans.map((x) => x.sourceRank)).toEqual(expectedRanks);
        const inRequest = new Uint8Array(decode.regionBytes);
        for (let layer = 0; layer < decode.layers; layer++)
          for (const kv of [0, 1] as const)
            for (let j = 0; j < n; j++)
              for (let t = 0; t < decode.tokensPerBlock; t++)
                for (let hl = 0; hl < decode.localHeads; hl++)
                  for (let x = 0; x < decode.headDim; x++)
                    for (let b = 0; b < decode.dtypeBytes; b++) {
                      const at = decode.offsetOf(layer, kv, to[j]) + innerOffset(decode, t, hl, x, b);
                      inRequest[at] = 1;
                      if (writes[at] !== 1 || dst[at] !== value(layer, kv, from[j], t, decode.firstHead + hl, x, b))
                        throw new Error(`trial ${trial} p=${p} d=${d} rank ${rank} ${JSON.stringify(shape)}: byte ${at} written ${writes[at]}x, value ${dst[at]}`);
                    }
        for (let i = 0; i < writes.length; i++) if (!inRequest[i]) expect(writes[i]).toBe(0);
        cases++;
      }
    }
    expect(cases).toBeGreaterThan(150);
  });

  it('covers the TP pairs the issue names, and coalesces contiguous block runs', () => {
    const shape = { modelId: 'llama', layers: 32, tokensPerBlock: 16, kvHeads: 8, headDim: 128, dtypeBytes: 2 };
    for (const [p, d] of [[1, 2], [2, 1], [2, 4], [4, 2], [1, 8]]) {
      const src = new KvLayout({ ...shape, blocks: 64, tp: { rank: 0, size: p } });
      for (let rank = 0; rank < d; rank++) {
        const dst = new KvLayout({ ...shape, blocks: 64, tp: { rank, size: d } });
        const plans = dst.planPull(src, [4, 5, 6, 7], [10, 11, 12, 13]);
        expect(plans.length).toBe(Math.max(1, p / d));
        const total = plans.reduce((a, x) => a + x.bytes, 0);
        expect(total).toBe(32 * 2 * 4 * dst.blockBytes); // exactly our share
      }
    }
    // Same TP, layer-major separate: 4 adjacent blocks on both sides coalesce to one run per (layer, K/V).
    const a = new KvLayout({ ...shape, blocks: 64 });
    expect(a.planPull(a, [4, 5, 6, 7], [10, 11, 12, 13])[0].lengths.length).toBe(64);
    // Block-major: a block's 64 (layer, K/V) pieces are one run; 4 adjacent blocks, one descriptor.
    const bm = new KvLayout({ ...shape, blocks: 64, order: 'block-major' });
    expect(bm.descriptorsFor([4, 5, 6, 7]).lengths.length).toBe(1);
    expect(bm.descriptorsFor([4, 6]).lengths.length).toBe(2);
    // NHD with different TP explodes into one run per token; HND keeps one per block.
    const nhd = (size: number, rank = 0) => new KvLayout({ ...shape, blocks: 64, blockLayout: 'NHD', tp: { rank, size } });
    expect(nhd(2).planPull(nhd(1), [1, 3], [2, 4])[0].lengths.length).toBe(32 * 2 * 2 * 16);
    const hnd = (size: number) => new KvLayout({ ...shape, blocks: 64, tp: { rank: 0, size } });
    expect(hnd(2).planPull(hnd(1), [1, 3], [2, 4])[0].lengths.length).toBe(32 * 2 * 2);
  });

  it('checks compatibility before any transfer, naming the field that differs', () => {
    const base = { modelId: 'llama', layers: 4, blocks: 8, tokensPerBlock: 16, kvHeads: 8, headDim: 128, dtypeBytes: 2 };
    const a = new KvLayout(base);
    expect(new KvLayout({ ...base, blocks: 99, tp: { rank: 1, size: 2 } }).compatibilityHash).toBe(a.compatibilityHash);
    for (const [field, v] of [['dtypeBytes', 1], ['headDim', 64], ['layers', 5], ['modelId', 'other'], ['tokensPerBlock', 32]] as const) {
      const b = new KvLayout({ ...base, [field]: v });
      expect(b.compatibilityHash).not.toBe(a.compatibilityHash);
      let err: unknown;
      try {
        a.planPull(b, [0], [0]);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvwireError);
      expect(err).toMatchObject({ code: 'ERR_MISMATCH' });
      expect((err as Error).message).toContain(field);
    }
    expect(() => a.assertCompatible({ ...a.compatibilityFields(), order: 'block-major' })).toThrow(/order/);
  });

  it('rejects bad shapes and block ids with ERR_INVALID_PARAM', () => {
    const base = { modelId: 'm', layers: 2, blocks: 4, tokensPerBlock: 4, kvHeads: 4, headDim: 8, dtypeBytes: 2 };
    expect(() => new KvLayout({ ...base, tp: { rank: 0, size: 3 } })).toThrow(/tp.size/);
    expect(() => new KvLayout({ ...base, tp: { rank: 2, size: 2 } })).toThrow(/tp.rank/);
    expect(() => new KvLayout({ ...base, layers: 0 })).toThrow(/layers/);
    expect(() => new KvLayout({ ...base, order: 'diagonal' as 'layer-major' })).toThrow(/order/);
    const l = new KvLayout(base);
    let err: unknown;
    try {
      l.descriptorsFor([0, 4]);
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'ERR_INVALID_PARAM', index: 1 });
    expect(() => l.planPull(l, [0, 1], [0])).toThrow(/2 source blocks for 1/);
    expect(() => l.planPull(l, [0], [0], [1, 3])).toThrow(/layers/);
  });
});
