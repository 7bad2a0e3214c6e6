#!/usr/bin/env node
// The `kvwire` command: demo, bench, info.
import './stdout-clean';
import { parseArgs } from 'node:util';
import { runDemo } from './demo';
import { parseBenchArgs, BENCH_USAGE } from './bench-args';
import { runBench, serveRemote } from './bench';
import { collectInfo, formatInfo } from './info';

const usage = `usage: kvwire <command> [options]
  demo   [--transport shm|tcp] [--memory dram|vram] [--requests N] [--tp P:D] [--decoders N] [--json]
         prefill -> decode workers over UCX, every byte verified (vram: KV pools in GPU memory, cuda_ipc)
  bench  ${BENCH_USAGE}
  info   [--json]                                         versions, UCX transports, CUDA devices,
                                                          and which transfer paths are ready here`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === 'demo') {
    const { values } = parseArgs({
      args: rest,
      options: {
        transport: { type: 'string', default: 'shm' },
        memory: { type: 'string', default: 'dram' },
        requests: { type: 'string', default: '100' },
        tp: { type: 'string', default: '1:1' },
        decoders: { type: 'string', default: '2' },
        json: { type: 'boolean', default: false },
      },
    });
    const requests = Number(values.requests);
    const decoders = Number(values.decoders);
    const tp = /^(\d+):(\d+)$/.exec(values.tp!);
    if (values.transport !== 'shm' && values.transport !== 'tcp') throw new Error(`--transport must be shm or tcp`);
    if (values.memory !== 'dram' && values.memory !== 'vram') throw new Error(`--memory must be dram or vram`);
    if (!Number.isSafeInteger(requests) || requests <= 0) throw new Error(`--requests must be a positive integer`);
    if (!Number.isSafeInteger(decoders) || decoders <= 0) throw new Error(`--decoders must be a positive integer`);
    const sizes = tp ? [Number(tp[1]), Number(tp[2])] : [];
    if (!tp || !sizes.every((x) => [1, 2, 4, 8].includes(x))) throw new Error(`--tp must be P:D with P and D in 1, 2, 4, 8 (8 KV heads)`);
    return runDemo({ transport: values.transport, memory: values.memory, requests, tp: sizes as [number, number], decoders, json: values.json! });
  }
  if (command === 'bench') {
    const b = parseBenchArgs(rest);
    if (b.help) {
      console.log(`kvwire bench ${BENCH_USAGE}`);
      return 0;
    }
    if (b.serve) return serveRemote(b.options, b.serve, b.host);
    return runBench(b.options);
  }
  if (command === 'info') {
    const { values } = parseArgs({ args: rest, options: { json: { type: 'boolean', default: false } } });
    const info = collectInfo();
    console.log(values.json ? JSON.stringify(info, null, 2) : formatInfo(info));
    return 0;
  }
  console.error(usage);
  return command ? 2 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`kvwire: ${err instanceof Error ? err.message : err}`);
    process.exit(1);
  },
);
