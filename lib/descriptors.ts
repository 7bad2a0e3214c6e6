import { check, KvwireError } from './errors';

/** Offsets or lengths: a plain array, any numeric typed array, or one number repeated. */
export type ByteSpans = ArrayLike<number> | Float64Array | Uint32Array | BigUint64Array | readonly bigint[];

/** What a DescriptorList points into: a local region or a peer's region. */
export interface DescriptorTarget {
  readonly name: string;
  readonly length: number;
}

/**
 * A batch of byte ranges inside one region, stored as parallel Float64Arrays (struct of arrays):
 * offset i and length i describe descriptor i. Build one with `region.descriptors(offsets, lengths)`.
 */
export class DescriptorList<T extends DescriptorTarget = DescriptorTarget> {
  /** @internal */
  constructor(
    readonly region: T,
    readonly offsets: Float64Array,
    readonly lengths: Float64Array,
  ) {}

  get count(): number {
    return this.offsets.length;
  }

  /** Total bytes described. */
  get bytes(): number {
    let sum = 0;
    for (let i = 0; i < this.lengths.length; i++) sum += this.lengths[i];
    return sum;
  }

  /** Validates and builds a list; every descriptor must lie inside `region`. */
  static build<T extends DescriptorTarget>(
    region: T,
    offsets: ByteSpans | number,
    lengths: ByteSpans | number,
  ): DescriptorList<T> {
    const count = typeof offsets === 'number' ? (typeof lengths === 'number' ? 1 : lengths.length) : offsets.length;
    const off = toFloat64('offsets', offsets, count);
    const len = toFloat64('lengths', lengths, count);
    const size = region.length;
    for (let i = 0; i < count; i++) {
      const o = off[i];
      const n = len[i];
      if (n <= 0) throw new KvwireError('ERR_INVALID_PARAM', `descriptor ${i} has length ${n}`, i);
      if (o + n > size)
        throw new KvwireError(
          'ERR_INVALID_PARAM',
          `descriptor ${i} (offset ${o}, length ${n}) lies outside region '${region.name}' (${size} bytes)`,
          i,
        );
    }
    return new DescriptorList(region, off, len);
  }
}

function toFloat64(field: string, values: ByteSpans | number, count: number): Float64Array {
  if (typeof values === 'number') {
    check(Number.isSafeInteger(values) && values >= 0, field, `must be a non-negative integer, got ${values}`);
    return new Float64Array(count).fill(values);
  }
  check(values != null && typeof (values as ArrayLike<unknown>).length === 'number', field, 'must be an array of integers');
  check(values.length === count, field, `has ${values.length} entries, expected ${count}`);
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const raw = (values as ArrayLike<number | bigint>)[i];
    const v = typeof raw === 'bigint' ? Number(raw) : raw;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
      throw new KvwireError('ERR_INVALID_PARAM', `${field}[${i}] must be a non-negative integer, got ${String(raw)}`, i);
    out[i] = v;
  }
  return out;
}
