#!/usr/bin/env node
// The `kvwire` command: demo, info.
import { parseArgs } from 'node:util';
import { runDemo } from './demo';
import { ucxVersion } from '../index';

const usage = `usage: kvwire <command> [options]
  demo   [--transport shm|tcp] [--requests N] [--json]   prefill -> decode over UCX, every byte verified
  info                                                    versions and build`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === 'demo') {
    const { values } = parseArgs({
      args: rest,
      options: {
        transport: { type: 'string', default: 'shm' },
        requests: { type: 'string', default: '200' },
        json: { type: 'boolean', default: false },
      },
    });
    const requests = Number(values.requests);
    if (values.transport !== 'shm' && values.transport !== 'tcp') throw new Error(`--transport must be shm or tcp`);
    if (!Number.isSafeInteger(requests) || requests <= 0) throw new Error(`--requests must be a positive integer`);
    // One block = 16 tokens x 8 KV heads x 128 dims x fp16 x (K and V) = 64 KiB for one layer.
    return runDemo({ transport: values.transport, requests, blocks: 2048, blockBytes: 64 << 10, json: values.json! });
  }
  if (command === 'info') {
    console.log(JSON.stringify({ kvwire: require('../../package.json').version, ucx: ucxVersion(), node: process.version }));
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
