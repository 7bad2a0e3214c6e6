// Command-line options of `kvwire bench`, checked with errors that name the option.
import { parseArgs } from 'node:util';
import { parseSize, type BenchOptions, type ExtraBaseline, type Pattern, type Transport } from './bench';
import type { MemoryKind, Op } from './bench-node';
import { PATH_NAMES } from '../transfer';

export const BENCH_USAGE = `[--transport shm,tcp] [--memory allocated,registered,vram,vram-dram] [--op write,read]
         [--pattern pairwise|many-to-one|one-to-many|all] [--fan 2] [--block 4K,64K,1M,...]
         [--batch auto|N] [--depth 1] [--runs 3] [--run-ms 200] [--layout spread|hot] [--progress event|poll] [--progress-thread on|off (default: on for event, off for poll)] [--cma on|off] [--path auto|am|cma|...]
         [--huge-pages] [--no-baselines]
         [--latency-samples 2000] [--idle-seconds 3] [--json] [--svg FILE] [--baseline nixl]
         [--serve FILE --host IP | --peer FILE]
         throughput and latency sweep, with ucx_perftest, Node socket and memcpy baselines;
         --baseline nixl also runs NIXL agents on the same pairwise cells and reports kvwire / NIXL
         (needs NIXL's Python package: pip install --no-deps nixl-cu12 numpy; else 'skipped')`;

const DEFAULT_BLOCKS = '4K,16K,64K,256K,1M,4M,16M,64M';

function list<T extends string>(name: string, text: string, allowed: readonly T[]): T[] {
  const items = text.split(',').map((s) => s.trim()).filter(Boolean);
  for (const x of items) if (!allowed.includes(x as T)) throw new Error(`--${name}: '${x}' is not one of ${allowed.join(', ')}`);
  if (!items.length) throw new Error(`--${name} is empty`);
  return [...new Set(items)] as T[];
}

function oneOf<T extends string>(name: string, text: string, allowed: readonly T[]): T {
  if (!allowed.includes(text as T)) throw new Error(`--${name} takes one of ${allowed.join(', ')}, not '${text}'`);
  return text as T;
}

/** What `parse` returns, or its error prefixed with the option's name. */
function named<T>(name: string, parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    throw new Error(`--${name}: ${(e as Error).message}`);
  }
}

function positive(name: string, text: string, min = 1): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}, not '${text}'`);
  return n;
}

export function parseBenchArgs(args: string[]): { options: BenchOptions; serve?: string; host: string; help: boolean } {
  const { values: v } = parseArgs({
    args,
    options: {
      transport: { type: 'string', default: 'shm,tcp' },
      memory: { type: 'string', default: 'allocated,registered' },
      op: { type: 'string', default: 'write,read' },
      pattern: { type: 'string', default: 'pairwise' },
      fan: { type: 'string', default: '2' },
      block: { type: 'string', default: DEFAULT_BLOCKS },
      batch: { type: 'string', default: 'auto' },
      depth: { type: 'string', default: '1' },
      runs: { type: 'string', default: '3' },
      'run-ms': { type: 'string', default: '200' },
      progress: { type: 'string', default: 'event' },
      cma: { type: 'string', default: 'on' },
      'progress-thread': { type: 'string' },
      path: { type: 'string', default: 'auto' },
      'huge-pages': { type: 'boolean', default: false },
      layout: { type: 'string', default: 'spread' },
      'no-baselines': { type: 'boolean', default: false },
      baseline: { type: 'string' },
      'latency-samples': { type: 'string', default: '2000' },
      'idle-seconds': { type: 'string', default: '3' },
      json: { type: 'boolean', default: false },
      svg: { type: 'string' },
      serve: { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      peer: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  const patterns: Pattern[] = v.pattern === 'all' ? ['pairwise', 'many-to-one', 'one-to-many'] : list('pattern', v.pattern!, ['pairwise', 'many-to-one', 'one-to-many'] as const);
  if (v.serve && v.peer) throw new Error('--serve and --peer are the two ends of a remote run; give one');
  const options: BenchOptions = {
    transports: v.peer || v.serve ? list('transport', v.transport === 'shm,tcp' ? 'tcp' : v.transport!, ['tcp'] as const) : list<Transport>('transport', v.transport!, ['shm', 'tcp']),
    // A remote target has one region, so a remote run is one memory kind (registered unless told).
    memories: list<MemoryKind>('memory', (v.peer || v.serve) && v.memory === 'allocated,registered' ? 'registered' : v.memory!,
      v.peer || v.serve ? ['allocated', 'registered'] : ['allocated', 'registered', 'vram', 'vram-dram']),
    ops: list<Op>('op', v.op!, ['write', 'read']),
    patterns,
    blocks: [...new Set(v.block!.split(',').map((x) => named('block', () => parseSize(x))))].sort((a, b) => a - b),
    batch: v.batch === 'auto' ? 0 : positive('batch', v.batch!),
    depth: positive('depth', v.depth!),
    fan: positive('fan', v.fan!, 2),
    runs: positive('runs', v.runs!),
    runMs: positive('run-ms', v['run-ms']!),
    progress: oneOf('progress', v.progress!, ['event', 'poll'] as const),
    cma: oneOf('cma', v.cma!, ['on', 'off'] as const) === 'on',
    progressThread: v['progress-thread'] === undefined ? undefined : oneOf('progress-thread', v['progress-thread'], ['on', 'off'] as const) === 'on',
    path: oneOf('path', v.path!, PATH_NAMES),
    hugePages: v['huge-pages']!,
    layout: oneOf('layout', v.layout!, ['spread', 'hot'] as const),
    baselines: !v['no-baselines'],
    extraBaselines: v.baseline === undefined ? [] : list<ExtraBaseline>('baseline', v.baseline, ['nixl']),
    latencySamples: positive('latency-samples', v['latency-samples']!, 0),
    idleSeconds: positive('idle-seconds', v['idle-seconds']!, 0),
    json: v.json!,
    svg: v.svg,
    peerFile: v.peer,
  };
  if (options.depth > 64) throw new Error(`--depth must be 1 .. 64 batches in flight, not ${options.depth}`);
  if (options.path === 'cma' && !options.cma) throw new Error("--path cma needs --cma on");
  if (options.path === 'cma' && !options.transports.includes('shm')) throw new Error('--path cma needs --transport shm (same-host peers)');
  if (options.path === 'cuda_ipc' && !options.memories.every((m) => m === 'vram' || m === 'vram-dram'))
    throw new Error('--path cuda_ipc needs --memory vram and/or vram-dram');
  if (options.path !== 'auto' && v.serve) throw new Error('--path applies to the initiator: give it with --peer, not --serve');
  return { options, serve: v.serve, host: v.host!, help: v.help! };
}
