// `kvwire demo`: a prefill process publishes KV blocks, this (decode) process pulls a stream of
// requests' blocks over real UCX, verifies every byte, and prints a table.
import { fork } from 'node:child_process';
import * as path from 'node:path';
import { Agent } from '../agent';

export interface DemoOptions {
  transport: 'shm' | 'tcp';
  requests: number;
  blocks: number; // blocks in the prefill pool
  blockBytes: number;
  json: boolean;
}

/** The same deterministic bytes on both sides: block b, word w -> a hash of (b, w). */
export function fillBlock(bytes: Uint8Array, block: number): void {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 2);
  let x = (block + 1) * 2654435761;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

function percentile(values: number[], p: number): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? 0;
}

export async function runDemo(opts: DemoOptions): Promise<number> {
  const transports = opts.transport === 'tcp' ? 'tcp' : 'shm,self';
  const prefill = fork(path.join(__dirname, 'prefill-worker.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const ready = new Promise<{ metadata: string }>((resolve, reject) => {
    prefill.once('message', (m: any) => resolve(m));
    prefill.once('exit', (c) => reject(new Error(`prefill worker exited with ${c}`)));
  });
  prefill.send({ transports, blocks: opts.blocks, blockBytes: opts.blockBytes });
  const { metadata } = await ready;

  const decode = await Agent.create({ name: 'decode-0', ucx: { transports } });
  const pool = decode.allocate(opts.blocks * opts.blockBytes, { name: 'kv' });
  const peer = decode.loadPeer(Buffer.from(metadata, 'base64'));
  const kv = peer.region('kv');
  const expected = new Uint8Array(opts.blockBytes);

  let seed = 7;
  const rand = () => (seed = (seed * 1103515245 + 12345) >>> 0);
  const times: number[] = [];
  let bytes = 0;
  let blocksMoved = 0;
  let errors = 0;
  const started = process.hrtime.bigint();
  for (let r = 0; r < opts.requests; r++) {
    // A request's prompt covers 4..64 blocks scattered in the prefill pool; decode puts them in its own free blocks.
    const n = 4 + (rand() % 61);
    const src = Array.from({ length: n }, () => rand() % opts.blocks);
    const dst = Array.from({ length: n }, (_, i) => (r * 64 + i) % opts.blocks);
    const stats = await decode.read(
      pool.descriptors(dst.map((b) => b * opts.blockBytes), opts.blockBytes),
      kv.descriptors(src.map((b) => b * opts.blockBytes), opts.blockBytes),
      { notify: `req-${r}`, deadlineMs: 10_000 },
    );
    times.push(stats.transferUs);
    bytes += stats.bytes;
    blocksMoved += n;
    for (let i = 0; i < n; i++) {
      fillBlock(expected, src[i]);
      const got = pool.bytes.subarray(dst[i] * opts.blockBytes, (dst[i] + 1) * opts.blockBytes);
      if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.byteLength), Buffer.from(expected)) !== 0) errors++;
    }
    if (!opts.json && process.stdout.isTTY) process.stdout.write(`\r  request ${r + 1}/${opts.requests}`);
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  if (!opts.json && process.stdout.isTTY) process.stdout.write('\n');
  prefill.send({ exit: true });
  await decode.close();

  const result = {
    transport: opts.transport,
    requests: opts.requests,
    blocks: blocksMoved,
    bytes,
    gbps: bytes / 1e9 / (times.reduce((a, b) => a + b, 0) / 1e6),
    p50Us: percentile(times, 50),
    p99Us: percentile(times, 99),
    wallSeconds: seconds,
    errors,
  };
  if (opts.json) console.log(JSON.stringify(result));
  else {
    console.log('kvwire demo: prefill -> decode over UCX (' + opts.transport + ')');
    console.table({
      requests: result.requests,
      blocks: result.blocks,
      'bytes (MiB)': +(result.bytes / 2 ** 20).toFixed(1),
      'GB/s (in transfer)': +result.gbps.toFixed(2),
      'p50 per request (µs)': +result.p50Us.toFixed(0),
      'p99 per request (µs)': +result.p99Us.toFixed(0),
      'wrong blocks': result.errors,
    });
  }
  return errors === 0 ? 0 : 1;
}
