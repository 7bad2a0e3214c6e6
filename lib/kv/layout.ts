// KV-cache layouts: how (layer, K/V, block, token, head, dim) maps to bytes of one worker's pool
// region, and the descriptor lists that move a request's blocks between two workers, including
// workers with different tensor parallelism (each decode rank pulls exactly its head slice).
import { createHash } from 'node:crypto';
import { check, KvwireError } from '../errors';

/** Where K and V of one layer live: separate planes, or side by side per block. */
export type KvArrangement = 'separate' | 'joint';
/** Whether a layer's blocks are contiguous ('layer-major') or a block's layers are ('block-major'). */
export type KvOrder = 'layer-major' | 'block-major';
/** Inside one block: [head][token][dim] ('HND': a head slice is contiguous) or [token][head][dim] ('NHD'). */
export type BlockLayout = 'HND' | 'NHD';

export interface KvLayoutSpec {
  /** Identifies the model; part of the compatibility hash. */
  modelId: string;
  layers: number;
  /** Blocks in this worker's pool. */
  blocks: number;
  tokensPerBlock: number;
  /** KV heads of the whole model (before tensor parallelism splits them). */
  kvHeads: number;
  headDim: number;
  /** Bytes per element (2 for fp16/bf16, 1 for fp8). */
  dtypeBytes: number;
  arrangement?: KvArrangement;
  order?: KvOrder;
  blockLayout?: BlockLayout;
  /** This worker's tensor-parallel rank and size; it holds kvHeads / size heads. */
  tp?: { rank: number; size: number };
}

/** The fields two workers must agree on before moving KV between them (TP and pool size may differ). */
const COMPATIBILITY_FIELDS = [
  'modelId',
  'dtypeBytes',
  'layers',
  'kvHeads',
  'headDim',
  'tokensPerBlock',
  'arrangement',
  'order',
  'blockLayout',
] as const;

/** Matched descriptor lists for one transfer from one source rank: offsets into each side's pool. */
export interface KvTransferPlan {
  /** The source (prefill) TP rank these bytes come from. */
  sourceRank: number;
  /** Offsets into the destination (this worker's) pool region. */
  destinationOffsets: Float64Array;
  /** Offsets into the source worker's pool region. */
  sourceOffsets: Float64Array;
  lengths: Float64Array;
  bytes: number;
}

function positiveInt(field: string, v: unknown): number {
  check(Number.isSafeInteger(v) && (v as number) > 0, field, `must be a positive integer, got ${String(v)}`);
  return v as number;
}

/** One worker's KV cache layout. */
export class KvLayout {
  readonly modelId: string;
  readonly layers: number;
  readonly blocks: number;
  readonly tokensPerBlock: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly dtypeBytes: number;
  readonly arrangement: KvArrangement;
  readonly order: KvOrder;
  readonly blockLayout: BlockLayout;
  readonly tpRank: number;
  readonly tpSize: number;
  /** Heads this rank holds, and the first one's global index. */
  readonly localHeads: number;
  readonly firstHead: number;
  /** Bytes of one (layer, K or V, block) on this rank. */
  readonly blockBytes: number;
  /** Bytes of the whole pool region. */
  readonly regionBytes: number;
  readonly #strides: { layer: number; kv: number; block: number };

  /** A spec, or another KvLayout (copied with its TP rank and size). */
  constructor(spec: KvLayoutSpec | KvLayout) {
    check(spec && typeof spec === 'object', 'layout', 'must be an object');
    if (spec instanceof KvLayout) spec = spec.spec();
    check(typeof spec.modelId === 'string' && spec.modelId.length > 0, 'modelId', 'must be a non-empty string');
    this.modelId = spec.modelId;
    this.layers = positiveInt('layers', spec.layers);
    this.blocks = positiveInt('blocks', spec.blocks);
    this.tokensPerBlock = positiveInt('tokensPerBlock', spec.tokensPerBlock);
    this.kvHeads = positiveInt('kvHeads', spec.kvHeads);
    this.headDim = positiveInt('headDim', spec.headDim);
    this.dtypeBytes = positiveInt('dtypeBytes', spec.dtypeBytes);
    this.arrangement = spec.arrangement ?? 'separate';
    this.order = spec.order ?? 'layer-major';
    this.blockLayout = spec.blockLayout ?? 'HND';
    check(['separate', 'joint'].includes(this.arrangement), 'arrangement', "must be 'separate' or 'joint'");
    check(['layer-major', 'block-major'].includes(this.order), 'order', "must be 'layer-major' or 'block-major'");
    check(['HND', 'NHD'].includes(this.blockLayout), 'blockLayout', "must be 'HND' or 'NHD'");
    this.tpSize = positiveInt('tp.size', spec.tp?.size ?? 1);
    this.tpRank = spec.tp?.rank ?? 0;
    check(Number.isSafeInteger(this.tpRank) && this.tpRank >= 0 && this.tpRank < this.tpSize, 'tp.rank', `must be in 0..${this.tpSize - 1}`);
    check(this.kvHeads % this.tpSize === 0, 'tp.size', `must divide kvHeads (${this.kvHeads}); got ${this.tpSize}`);
    this.localHeads = this.kvHeads / this.tpSize;
    this.firstHead = this.tpRank * this.localHeads;
    this.blockBytes = this.tokensPerBlock * this.localHeads * this.headDim * this.dtypeBytes;
    this.regionBytes = this.layers * 2 * this.blocks * this.blockBytes;
    check(Number.isSafeInteger(this.regionBytes), 'layout', 'region size exceeds 2^53 bytes');
    const B = this.blockBytes;
    this.#strides =
      this.order === 'block-major'
        ? { block: this.layers * 2 * B, layer: 2 * B, kv: B }
        : this.arrangement === 'joint'
          ? { layer: this.blocks * 2 * B, block: 2 * B, kv: B }
          : { layer: 2 * this.blocks * B, kv: this.blocks * B, block: B };
  }

  /** Byte offset of (layer, kv 0=K 1=V, block) in the pool region. */
  offsetOf(layer: number, kv: 0 | 1, block: number): number {
    return layer * this.#strides.layer + kv * this.#strides.kv + block * this.#strides.block;
  }

  /** Hash of what must match between workers (model, dtype, shape, arrangement); hex SHA-256. */
  get compatibilityHash(): string {
    return createHash('sha256').update(JSON.stringify(this.compatibilityFields())).digest('hex');
  }

  compatibilityFields(): Record<(typeof COMPATIBILITY_FIELDS)[number], string | number> {
    const out = {} as Record<(typeof COMPATIBILITY_FIELDS)[number], string | number>;
    for (const f of COMPATIBILITY_FIELDS) out[f] = this[f];
    return out;
  }

  /** Throws ERR_MISMATCH naming the first field that differs from `other` (another worker's layout). */
  assertCompatible(other: KvLayout | Record<string, string | number>): void {
    const theirs = other instanceof KvLayout ? other.compatibilityFields() : other;
    const mine = this.compatibilityFields();
    for (const f of COMPATIBILITY_FIELDS)
      if (theirs[f] !== mine[f])
        throw new KvwireError('ERR_MISMATCH', `KV layouts differ in ${f}: ${JSON.stringify(mine[f])} here, ${JSON.stringify(theirs[f])} at the peer`);
  }

  /** Descriptors (offsets, lengths) of every (layer, K/V, block) of `blockIds` in this pool, adjacent runs coalesced. */
  descriptorsFor(blockIds: ArrayLike<number>, layers: [number, number] = [0, this.layers]): { offsets: Float64Array; lengths: Float64Array } {
    this.#checkBlocks('blockIds', blockIds);
    const offsets: number[] = [];
    const lengths: number[] = [];
    this.#inMemoryOrder(blockIds.length, layers, (layer, kv, i) =>
      push(offsets, lengths, this.offsetOf(layer, kv, blockIds[i]), this.blockBytes),
    );
    return { offsets: Float64Array.from(offsets), lengths: Float64Array.from(lengths) };
  }

  /**
   * What this (destination) worker must read from each source rank to fill `destinationBlocks[i]`
   * with `sourceBlocks[i]` of the source layout: one plan per source rank whose heads overlap ours.
   * Every destination byte of those blocks is covered exactly once; runs adjacent on both sides
   * are coalesced. `source` describes any one source rank (its tp.size matters, not its rank).
   */
  planPull(
    source: KvLayout,
    sourceBlocks: ArrayLike<number>,
    destinationBlocks: ArrayLike<number>,
    layers: [number, number] = [0, this.layers],
  ): KvTransferPlan[] {
    this.assertCompatible(source);
    check(sourceBlocks.length === destinationBlocks.length, 'blocks', `${sourceBlocks.length} source blocks for ${destinationBlocks.length} destination blocks`);
    this.#checkBlocks('destinationBlocks', destinationBlocks);
    check(Number.isSafeInteger(layers[0]) && Number.isSafeInteger(layers[1]) && 0 <= layers[0] && layers[0] < layers[1] && layers[1] <= this.layers, 'layers', `must be a range inside 0..${this.layers}`);
    const plans: KvTransferPlan[] = [];
    const srcHeads = source.localHeads;
    for (let rank = 0; rank < source.tpSize; rank++) {
      const src = rank === source.tpRank ? source : source.#withRank(rank);
      src.#checkBlocks('sourceBlocks', sourceBlocks);
      const lo = Math.max(this.firstHead, rank * srcHeads);
      const hi = Math.min(this.firstHead + this.localHeads, (rank + 1) * srcHeads);
      if (lo >= hi) continue;
      const dstOff: number[] = [];
      const srcOff: number[] = [];
      const lens: number[] = [];
      const elem = this.headDim * this.dtypeBytes;
      this.#inMemoryOrder(destinationBlocks.length, layers, (layer, kv, i) => {
        const dBase = this.offsetOf(layer, kv, destinationBlocks[i]);
        const sBase = src.offsetOf(layer, kv, sourceBlocks[i]);
        if (this.blockLayout === 'HND') {
          // [head][token][dim]: the overlapping heads are one contiguous run on each side.
          const run = this.tokensPerBlock * elem;
          pushPair(dstOff, srcOff, lens, dBase + (lo - this.firstHead) * run, sBase + (lo - src.firstHead) * run, (hi - lo) * run);
        } else {
          // [token][head][dim]: one run per token (the per-token explosion when TP differs).
          for (let t = 0; t < this.tokensPerBlock; t++)
            pushPair(
              dstOff,
              srcOff,
              lens,
              dBase + (t * this.localHeads + (lo - this.firstHead)) * elem,
              sBase + (t * src.localHeads + (lo - src.firstHead)) * elem,
              (hi - lo) * elem,
            );
        }
      });
      plans.push({
        sourceRank: rank,
        destinationOffsets: Float64Array.from(dstOff),
        sourceOffsets: Float64Array.from(srcOff),
        lengths: Float64Array.from(lens),
        bytes: lens.reduce((a, b) => a + b, 0),
      });
    }
    return plans;
  }

  /**
   * Visits, in one canonical order (layer, K/V, block, token), where the slice of global heads
   * [lo, hi) of each token of `blockIds` lies in this pool: `visit(offset, length)`. Two workers
   * that walk the same blocks this way agree on the order, so one can gather what the other
   * scatters (the staging path for NHD blocks across TP).
   */
  forEachHeadSlice(blockIds: ArrayLike<number>, layers: [number, number], lo: number, hi: number, visit: (offset: number, length: number) => void): void {
    this.#checkBlocks('blockIds', blockIds);
    check(lo >= this.firstHead && hi <= this.firstHead + this.localHeads && lo < hi, 'heads', `[${lo}, ${hi}) is not inside this rank's heads`);
    const elem = this.headDim * this.dtypeBytes;
    for (let layer = layers[0]; layer < layers[1]; layer++)
      for (const kv of [0, 1] as const)
        for (let i = 0; i < blockIds.length; i++) {
          const base = this.offsetOf(layer, kv, blockIds[i]);
          if (this.blockLayout === 'HND') {
            const run = this.tokensPerBlock * elem;
            visit(base + (lo - this.firstHead) * run, (hi - lo) * run);
          } else {
            for (let t = 0; t < this.tokensPerBlock; t++) visit(base + (t * this.localHeads + (lo - this.firstHead)) * elem, (hi - lo) * elem);
          }
        }
  }

  /** The global heads [lo, hi) this rank shares with `other`'s rank `rank` (empty when lo >= hi). */
  sharedHeads(other: KvLayout, rank: number): [number, number] {
    const theirs = other.localHeads;
    return [Math.max(this.firstHead, rank * theirs), Math.min(this.firstHead + this.localHeads, (rank + 1) * theirs)];
  }

  // Visits (layer, K/V, i-th block) in this layout's memory order, so adjacent pieces come in a row
  // and coalesce.
  #inMemoryOrder(count: number, layers: [number, number], visit: (layer: number, kv: 0 | 1, i: number) => void): void {
    const kvs = [0, 1] as const;
    if (this.order === 'block-major') {
      for (let i = 0; i < count; i++) for (let layer = layers[0]; layer < layers[1]; layer++) for (const kv of kvs) visit(layer, kv, i);
    } else if (this.arrangement === 'joint') {
      for (let layer = layers[0]; layer < layers[1]; layer++) for (let i = 0; i < count; i++) for (const kv of kvs) visit(layer, kv, i);
    } else {
      for (let layer = layers[0]; layer < layers[1]; layer++) for (const kv of kvs) for (let i = 0; i < count; i++) visit(layer, kv, i);
    }
  }

  #withRank(rank: number): KvLayout {
    return new KvLayout({ ...this.spec(), tp: { rank, size: this.tpSize } });
  }

  /** The spec this layout was built from (defaults filled in). */
  spec(): Required<KvLayoutSpec> {
    return {
      modelId: this.modelId,
      layers: this.layers,
      blocks: this.blocks,
      tokensPerBlock: this.tokensPerBlock,
      kvHeads: this.kvHeads,
      headDim: this.headDim,
      dtypeBytes: this.dtypeBytes,
      arrangement: this.arrangement,
      order: this.order,
      blockLayout: this.blockLayout,
      tp: { rank: this.tpRank, size: this.tpSize },
    };
  }

  #checkBlocks(field: string, ids: ArrayLike<number>): void {
    check(ids != null && typeof ids.length === 'number', field, 'must be an array of block ids');
    for (let i = 0; i < ids.length; i++)
      if (!Number.isSafeInteger(ids[i]) || ids[i] < 0 || ids[i] >= this.blocks)
        throw new KvwireError('ERR_INVALID_PARAM', `${field}[${i}] = ${ids[i]} is not a block of this pool (0..${this.blocks - 1})`, i);
  }
}

function push(offsets: number[], lengths: number[], offset: number, length: number): void {
  const n = offsets.length;
  if (n > 0 && offsets[n - 1] + lengths[n - 1] === offset) lengths[n - 1] += length;
  else {
    offsets.push(offset);
    lengths.push(length);
  }
}

function pushPair(dst: number[], src: number[], lengths: number[], d: number, s: number, length: number): void {
  const n = dst.length;
  if (n > 0 && dst[n - 1] + lengths[n - 1] === d && src[n - 1] + lengths[n - 1] === s) lengths[n - 1] += length;
  else {
    dst.push(d);
    src.push(s);
    lengths.push(length);
  }
}
