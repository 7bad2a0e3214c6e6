// `kvwire demo`: prefill ranks and decode workers in separate processes. The prefill ranks fill
// their KV pools; a stream of requests with varied prompt lengths follows; for each, the prefill
// publishes the request's blocks and every rank of one decode worker pulls its head slice into its
// own free blocks over UCX, verifies every byte, and says done, after which prefill frees them.
import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { cudaInfo } from '../index';
import type { KvLayoutSpec } from '../kv/layout';
import { percentile } from './stats';

export interface DemoOptions {
  transport: 'shm' | 'tcp';
  requests: number;
  /** Prefill TP size : decode TP size. */
  tp: [number, number];
  /** Independent decode workers (each with `tp[1]` ranks); requests alternate between them. */
  decoders: number;
  /** Where the KV pools live: host memory, or GPU memory (device 0) moved by path cuda_ipc. */
  memory: 'dram' | 'vram';
  json: boolean;
}

/** A Llama-3-8B-like KV cache: 32 layers, 8 KV heads of 128, fp16, 16-token blocks, HND. */
export const DEMO_SHAPE = {
  modelId: 'llama-3-8b-like',
  layers: 32,
  tokensPerBlock: 16,
  kvHeads: 8,
  headDim: 128,
  dtypeBytes: 2,
  blockLayout: 'HND',
} as const;
const PREFILL_BLOCKS = 256;
const DECODE_BLOCKS = 128;
const MAX_PROMPT_TOKENS = 1024; // at most 64 blocks: every other block of a decode pool fits one request

class Worker {
  readonly child: ChildProcess;
  #waiting = new Map<string, (m: any) => void>();
  constructor(script: string, readonly name: string) {
    // The workers' stdout (UCX logs there by default) goes to stderr: stdout carries the demo's own
    // output only (with --json, one JSON line; a UCX warning once broke it).
    this.child = fork(path.join(__dirname, script), [], { stdio: ['ignore', 2, 'inherit', 'ipc'] });
    this.child.on('message', (m: any) => {
      const key = `${m.t}:${m.req ?? ''}`;
      const done = this.#waiting.get(key);
      this.#waiting.delete(key);
      done?.(m);
    });
    this.child.on('exit', (code) => {
      for (const done of this.#waiting.values()) done({ error: `${name} exited with ${code}` });
      this.#waiting.clear();
    });
  }
  expect(t: string, req = ''): Promise<any> {
    return new Promise((resolve) => this.#waiting.set(`${t}:${req}`, resolve));
  }
  send(m: object): void {
    if (this.child.connected) this.child.send(m);
  }
}

function progress(done: number, total: number, json: boolean): void {
  if (json) return;
  const width = 30;
  const filled = Math.round((done / total) * width);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${total} requests`;
  if (process.stderr.isTTY) process.stderr.write(`\r  ${bar}${done === total ? '\n' : ''}`);
  else if (done === total || done % Math.max(1, Math.floor(total / 10)) === 0) process.stderr.write(`  ${bar}\n`);
}

export async function runDemo(opts: DemoOptions): Promise<number> {
  const transports = opts.transport === 'tcp' ? 'tcp' : 'shm,self';
  // Every agent of this run shares one fresh secret: connections are authenticated (README: Security).
  const secret = randomBytes(32).toString('base64');
  const [P, D] = opts.tp;
  const cuda = opts.memory === 'vram' ? cudaInfo() : undefined;
  if (cuda && !cuda.available) throw new Error(`--memory vram: no CUDA (${cuda.reason})`);
  const spec = (blocks: number, rank: number, size: number): KvLayoutSpec => ({ ...DEMO_SHAPE, blocks, tp: { rank, size } });
  const prefills = Array.from({ length: P }, (_, r) => new Worker('prefill-worker.js', `prefill-${r}`));
  const decoders = Array.from({ length: opts.decoders }, (_, i) =>
    Array.from({ length: D }, (_, r) => new Worker('decode-worker.js', `decode-${i}.${r}`)),
  );
  const all = [...prefills, ...decoders.flat()];
  try {
    const ready = prefills.map((w) => w.expect('ready'));
    prefills.forEach((w, r) => w.send({ cmd: 'init', name: w.name, layout: spec(PREFILL_BLOCKS, r, P), transports, secret, memory: opts.memory }));
    const metadata = (await Promise.all(ready)).map((m) => {
      if (!m.metadata) throw new Error(m.error ?? 'prefill failed to start');
      return m.metadata as string;
    });
    const decodeReady = decoders.flat().map((w) => w.expect('ready'));
    decoders.forEach((group) =>
      group.forEach((w, r) =>
        w.send({ cmd: 'init', name: w.name, layout: spec(DECODE_BLOCKS, r, D), prefillLayout: spec(PREFILL_BLOCKS, 0, P), prefills: metadata, transports, secret, memory: opts.memory }),
      ),
    );
    for (const m of await Promise.all(decodeReady)) if (m.error) throw new Error(m.error);

    // Prefill blocks are shared by all requests in flight; each decode worker serves one at a time.
    const freePrefill = Array.from({ length: PREFILL_BLOCKS }, (_, i) => i);
    let seed = 7;
    const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
    const times: number[] = [];
    let bytes = 0;
    let blocks = 0;
    let wrong = 0;
    const errors: string[] = [];
    let done = 0;
    const started = process.hrtime.bigint();
    const serve = async (instance: number) => {
      for (let r = instance; r < opts.requests; r += opts.decoders) {
        const tokens = 16 + (rand() % (MAX_PROMPT_TOKENS - 15));
        const n = Math.ceil(tokens / DEMO_SHAPE.tokensPerBlock);
        const src = freePrefill.splice(0, n).sort(() => (rand() & 1) - 0.5); // scattered, as a real allocator leaves them
        const dst = Array.from({ length: n }, (_, i) => i * 2 + (r % 2)); // every other block of the pool
        const req = `req-${r}`;
        const freed = prefills.map((w) => w.expect('freed', req));
        prefills.forEach((w) => w.send({ cmd: 'publish', req, blocks: src, readers: D }));
        const group = decoders[instance];
        const pulled = group.map((w) => w.expect('pulled', req));
        group.forEach((w) => w.send({ cmd: 'pull', req, sourceBlocks: src, destinationBlocks: dst }));
        const results = await Promise.all(pulled);
        for (const x of results) {
          if (x.error) errors.push(`${req}: ${x.error}`);
          else wrong += x.wrong;
          bytes += x.bytes ?? 0;
        }
        times.push(Math.max(...results.map((x) => x.transferUs ?? 0)));
        blocks += dst.length;
        for (const f of await Promise.all(freed)) if (f.error) errors.push(`${req}: ${f.error}`);
        freePrefill.push(...src);
        progress(++done, opts.requests, opts.json);
      }
    };
    await Promise.all(decoders.map((_, i) => serve(i)));
    const wallSeconds = Number(process.hrtime.bigint() - started) / 1e9;
    const result = {
      transport: opts.transport,
      memory: opts.memory,
      /** With --memory vram on kvwire's CUDA test double: host memory stood in for the GPUs. */
      cudaTestDouble: cuda?.testDouble,
      tp: `${P}:${D}`,
      decoders: opts.decoders,
      requests: opts.requests,
      blocks,
      bytes,
      gbps: bytes / 1e9 / wallSeconds,
      p50Us: percentile(times, 50),
      p99Us: percentile(times, 99),
      wallSeconds,
      wrongBytes: wrong,
      errors: errors.length,
      /** The first few errors, verbatim. */
      errorMessages: errors.slice(0, 5),
    };
    if (opts.json) console.log(JSON.stringify(result));
    else {
      if (cuda) console.log(`KV pools in VRAM (device 0${cuda.testDouble ? `, CUDA TEST DOUBLE: ${cuda.testDouble}` : `: ${cuda.devices[0]?.name}`}), pulled by path cuda_ipc`);
      console.log(`kvwire demo: prefill TP ${P} -> ${opts.decoders} decode worker(s) of TP ${D} over UCX (${opts.transport}); ` +
        `${DEMO_SHAPE.layers} layers, ${DEMO_SHAPE.kvHeads} KV heads x ${DEMO_SHAPE.headDim}, fp16, ${DEMO_SHAPE.tokensPerBlock}-token blocks`);
      console.table({
        requests: result.requests,
        'blocks (all layers)': result.blocks,
        'moved (MiB)': +(result.bytes / 2 ** 20).toFixed(0),
        'GB/s (wall, incl. verification)': +result.gbps.toFixed(2),
        'p50 pull per request (ms)': +(result.p50Us / 1e3).toFixed(1),
        'p99 pull per request (ms)': +(result.p99Us / 1e3).toFixed(1),
        'wrong bytes': result.wrongBytes,
        errors: result.errors,
      });
      for (const e of errors.slice(0, 5)) console.error(`  ${e}`);
    }
    return wrong === 0 && errors.length === 0 ? 0 : 1;
  } finally {
    for (const w of all) w.send({ cmd: 'exit' });
  }
}
