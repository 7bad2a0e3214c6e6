// Metadata codec: round trip, and rejection of every malformed variant (never a crash).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvwireError, decodeMetadata } from '../lib';
import { reencodeMetadata as reencode, reseal } from './helpers';

function code(fn: () => unknown): string {
  try {
    fn();
    return 'OK';
  } catch (e) {
    expect(e).toBeInstanceOf(KvwireError);
    return (e as KvwireError).code;
  }
}

// Offsets of fields in a blob, found by walking the documented layout.
function fieldOffsets(blob: Buffer) {
  let p = 12;
  const nameLen = blob[p];
  p += 1 + nameLen + 8 + 8;
  const backendLen = blob[p];
  p += 1 + backendLen;
  const addressLength = p;
  p += 4 + blob.readUInt32LE(p);
  const regionCount = p;
  return { addressLength, regionCount, firstRegion: p + 4 };
}

describe('metadata codec', () => {
  let agent: Agent;
  let blob: Buffer;
  beforeAll(async () => {
    agent = await Agent.create({ name: 'codec' });
    agent.allocate(1 << 16, { name: 'kv', access: 'read' });
    agent.register(Buffer.alloc(4096), { name: 'staging', access: 'write' });
    blob = Buffer.from(agent.metadata());
  });
  afterAll(() => agent.close());

  it('round-trips what the agent publishes', () => {
    const md = decodeMetadata(blob) as any;
    expect(md.name).toBe('codec');
    expect(md.backend).toBe('ucx');
    expect(md.generation).toBeGreaterThanOrEqual(3);
    expect(md.workerAddressBytes).toBeGreaterThan(0);
    expect(md.regions.map((r: any) => [r.name, r.length, r.allocated])).toEqual(
      expect.arrayContaining([
        ['kv', 1 << 16, true],
        ['staging', 4096, false],
      ]),
    );
  });

  it('rejects the blob truncated at every byte', () => {
    for (let n = 0; n < blob.length; n++) expect(code(() => decodeMetadata(blob.subarray(0, n))), `length ${n}`).toBe('ERR_INVALID_PARAM');
  });

  it('rejects wrong magic, version, flags, body length and trailing bytes', () => {
    const mutate = (fn: (b: Buffer) => void) => {
      const b = Buffer.from(blob);
      fn(b);
      return code(() => decodeMetadata(reseal(b)));
    };
    expect(mutate(() => {})).toBe('OK');
    expect(mutate((b) => (b[0] ^= 0xff))).toBe('ERR_INVALID_PARAM');
    expect(mutate((b) => b.writeUInt16LE(1, 4))).toBe('ERR_INVALID_PARAM');
    expect(mutate((b) => b.writeUInt16LE(2, 4))).toBe('ERR_INVALID_PARAM'); // before region sections
    expect(mutate((b) => b.writeUInt16LE(4, 4))).toBe('ERR_INVALID_PARAM');
    expect(mutate((b) => b.writeUInt16LE(1, 6))).toBe('ERR_INVALID_PARAM');
    expect(mutate((b) => b.writeUInt32LE(b.readUInt32LE(8) + 1, 8))).toBe('ERR_INVALID_PARAM');
    expect(code(() => decodeMetadata(reseal(Buffer.concat([blob, Buffer.from([0])]))))).toBe('ERR_INVALID_PARAM');
    expect(() => decodeMetadata(Buffer.from([1, 2, 3]))).toThrow(/shorter than the 12-byte header/);
  });

  it('reads a version-2 blob (the previous release: no region sections); refuses a host region without a key', () => {
    expect(code(() => decodeMetadata(reencode(blob, () => {})))).toBe('OK');
    const v2 = decodeMetadata(reencode(blob, () => {}, 2)) as any;
    expect(v2.regions.map((r: any) => r.name).sort()).toEqual(['kv', 'staging']);
    const keyless = reencode(blob, (regions) => (regions[0].key = Buffer.alloc(0)));
    expect(() => decodeMetadata(keyless)).toThrow(/host memory without a key/);
    // A VRAM region (kind byte 1) carrying a UCX key: not what this version publishes.
    const vramWithKey = reencode(blob, (regions) => {
      const f = Buffer.from(regions[0].fixed);
      f[4 + 1 + f[4]] = 1;
      regions[0].fixed = f;
    });
    expect(() => decodeMetadata(vramWithKey)).toThrow(/VRAM with a UCX key/);
  });

  it('rejects huge counts and lengths without allocating them', () => {
    const { addressLength, regionCount, firstRegion } = fieldOffsets(blob);
    for (const [offset, value] of [
      [regionCount, 0xffffffff],
      [regionCount, 65537],
      [addressLength, 0xffffffff],
      [addressLength, 0x7fffffff],
    ]) {
      const b = Buffer.from(blob);
      b.writeUInt32LE(value, offset);
      expect(code(() => decodeMetadata(reseal(b))), `offset ${offset} = ${value}`).toBe('ERR_INVALID_PARAM');
    }
    // A region with an unknown kind, access or zero length.
    const nameLen = blob[firstRegion + 4];
    const kindAt = firstRegion + 4 + 1 + nameLen;
    for (const [at, v] of [
      [kindAt, 9],
      [kindAt + 1, 0],
      [kindAt + 1, 4],
      [kindAt + 2, 2],
    ]) {
      const b = Buffer.from(blob);
      b[at] = v;
      expect(code(() => decodeMetadata(reseal(b)))).toBe('ERR_INVALID_PARAM');
    }
    const zero = Buffer.from(blob);
    zero.writeBigUInt64LE(0n, kindAt + 3 + 4 + 8);
    expect(code(() => decodeMetadata(reseal(zero)))).toBe('ERR_INVALID_PARAM');
  });

  it('refuses any altered byte by its checksum, before parsing anything', () => {
    for (let at = 0; at < blob.length; at++) {
      const b = Buffer.from(blob);
      b[at] ^= 0x5a;
      let message = '';
      try {
        decodeMetadata(b);
      } catch (e) {
        expect((e as KvwireError).code).toBe('ERR_INVALID_PARAM');
        message = (e as Error).message;
      }
      // The header fields are checked first; every other byte is caught by the checksum.
      if (at >= 12) expect(message, `byte ${at}`).toContain('checksum mismatch');
      else expect(message, `byte ${at}`).not.toBe('');
    }
  });

  it('never crashes on random corruption: each variant decodes or fails with ERR_INVALID_PARAM', () => {
    let x = 12345;
    const next = () => (x = (x * 1103515245 + 12345) >>> 0);
    const seen = new Set<string>();
    for (let i = 0; i < 3000; i++) {
      const b = Buffer.from(blob);
      const flips = 1 + (next() % 4);
      for (let f = 0; f < flips; f++) b[next() % b.length] = next() & 0xff;
      const c = code(() => decodeMetadata(reseal(b))); // resealed: the parser itself must hold
      seen.add(c);
      expect(['OK', 'ERR_INVALID_PARAM']).toContain(c);
    }
    expect(seen.has('ERR_INVALID_PARAM')).toBe(true);
  });
});

describe('coalescing', () => {
  it('merges runs adjacent on both sides, and only those', async () => {
    const a = await Agent.create({ name: 'co-a' });
    const b = await Agent.create({ name: 'co-b' });
    const l = a.register(Buffer.alloc(1 << 16).fill(1), { name: 'l' });
    b.register(Buffer.alloc(1 << 16), { name: 'kv' });
    const kv = a.loadPeer(b.metadata()).region('kv');
    const both = await a.write(l.descriptors([0, 64, 128, 192], 64), kv.descriptors([1000, 1064, 1128, 1192], 64));
    expect(both.segments).toBe(1);
    const localOnly = await a.write(l.descriptors([0, 64, 128], 64), kv.descriptors([0, 200, 400], 64));
    expect(localOnly.segments).toBe(3);
    const mixed = await a.write(l.descriptors([0, 64, 500, 564, 2000], 64), kv.descriptors([0, 64, 128, 192, 256], 64));
    expect(mixed.segments).toBe(3);
    expect(mixed.descriptors).toBe(5);
    expect(mixed.bytes).toBe(320);
    await a.close();
    await b.close();
  });
});
