// `kvwire bench`: kvwire's transfer paths swept over block size, batch, READ/WRITE, memory kind,
// transport and pattern, between real processes, each cell next to its baselines measured in the
// same run (ucx_perftest, a plain Node `net` socket, single-thread memcpy; NIXL with `--baseline
// nixl`), as ratios.
import { fork, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { cudaInfo, ucxVersion, type TransferPath } from '../index';
import { perftest, perftestErrorHandling, perftestFor, perftestMissing, perftestServerLoop, type PerftestResult } from './baselines';
import { init as initNode, memoryOf, wallUs, type BatchSample, type MemoryKind, type Op, type RunResult } from './bench-node';
import { carriersOf, carrierSummary, carrierText, type Carrier, type ConnectionView } from './carriers';
import { chartSvg } from './chart';
import { nixlCell, nixlProgress, probeNixl, type NixlResult } from './nixl';
import { median, percentile } from './stats';

export type Pattern = 'pairwise' | 'many-to-one' | 'one-to-many';
export type Transport = 'shm' | 'tcp';
/** Baselines run only when asked for (`--baseline`): other transfer libraries. */
export type ExtraBaseline = 'nixl';

export interface BenchOptions {
  transports: Transport[];
  memories: MemoryKind[];
  ops: Op[];
  patterns: Pattern[];
  blocks: number[];
  /** Blocks per batch; 0 = automatic (about 16 MiB per batch, 1..1024 blocks). */
  batch: number;
  /** Batches each initiator keeps in flight per target (1: post the next when the last settled). */
  depth: number;
  /** Initiators (many-to-one) or targets (one-to-many). */
  fan: number;
  runs: number;
  runMs: number;
  /** 'spread' (default): distinct scattered blocks; 'hot': every block at one offset, like ucx_perftest. */
  layout: 'spread' | 'hot';
  progress: 'event' | 'poll';
  /** Agents may use path 'cma' (same-host one-sided copies of registered memory); off: active messages. */
  cma: boolean;
  /** Agents' native progress thread (AgentOptions.progressThread); undefined: the library's default (on in event mode, off in poll mode). */
  progressThread?: boolean;
  /** The path every timed batch asks for ('auto': the agent chooses; warm-up batches always use 'auto'). */
  path: 'auto' | TransferPath;
  /** Registered regions advised for transparent huge pages (registered, then filled). */
  hugePages: boolean;
  baselines: boolean;
  /** `--baseline nixl`: NIXL agents on the same pairwise cells, in the same run. */
  extraBaselines: ExtraBaseline[];
  /** Samples of the 4 KiB WRITE + notification ping-pong per progress mode; 0 skips it. */
  latencySamples: number;
  /** Seconds of idle CPU measurement with a connected peer; 0 skips it. */
  idleSeconds: number;
  json: boolean;
  svg?: string;
  /** A remote target's description file, written by `kvwire bench --serve`. */
  peerFile?: string;
}

const DESCRIPTOR_CELL = { block: 64, batch: 10_000 };

/** Spread: a batch's blocks scattered over twice as many slots (a real KV pool); hot: one slot reused, as ucx_perftest does. */
const slotsFor = (opts: BenchOptions, batch: number) => (opts.layout === 'hot' ? 1 : 2 * batch);

export function autoBatch(block: number, batch: number): number {
  return batch > 0 ? batch : Math.max(1, Math.min(1024, Math.floor((16 << 20) / block)));
}

export function parseSize(text: string): number {
  const m = /^(\d+)([KMG]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new Error(`'${text}' is not a size (e.g. 4096, 64K, 4M)`);
  const n = Number(m[1]) * { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G'];
  if (!Number.isSafeInteger(n) || n <= 0 || n > 1 << 30) throw new Error(`size '${text}' must be 1 B .. 1 GiB`);
  return n;
}

export const formatSize = (n: number): string =>
  n >= 1 << 20 && n % (1 << 20) === 0 ? `${n >> 20} MiB` : n >= 1024 && n % 1024 === 0 ? `${n >> 10} KiB` : `${n} B`;

const round = (x: number, d = 2) => +x.toFixed(d);

/** A bench node process, driven by { id, cmd } messages. */
class Node {
  readonly child: ChildProcess;
  #next = 1;
  #waiting = new Map<number, { resolve: (m: any) => void; reject: (e: Error) => void }>();
  constructor(readonly name: string) {
    this.child = fork(path.join(__dirname, 'bench-node.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.child.on('message', (m: any) => {
      const w = this.#waiting.get(m.id);
      this.#waiting.delete(m.id);
      if (m.ok) w?.resolve(m);
      else w?.reject(new Error(`${name}: ${m.error}`));
    });
    this.child.on('exit', (code, signal) => {
      for (const w of this.#waiting.values()) w.reject(new Error(`${name} exited (${signal ?? code})`));
      this.#waiting.clear();
    });
  }
  call<T = any>(cmd: string, args: object = {}): Promise<T> {
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      if (!this.child.connected) return reject(new Error(`${this.name} is not running`));
      this.#waiting.set(id, { resolve, reject });
      this.child.send({ id, cmd, ...args });
    });
  }
  async exit(): Promise<void> {
    if (!this.child.connected) return;
    const gone = new Promise((r) => this.child.once('exit', r));
    this.child.send({ cmd: 'exit' });
    await Promise.race([gone, new Promise((r) => setTimeout(r, 5000))]);
    this.child.kill('SIGKILL');
  }
}

export interface Cell {
  transport: Transport;
  memory: MemoryKind;
  pattern: Pattern;
  op: Op;
  block: number;
  batch: number;
  path: string;
  /**
   * What carried the blocks on each of those paths: the protocol UCX selected for the data messages
   * (from UCX's own description of the endpoint, after the timed runs) or kvwire's own copy.
   */
  carriers: Carrier[];
  /** Median over runs of bytes / wall time, all initiators together, GB/s (1e9). */
  gbps: number;
  runsGbps: number[];
  /** Mean post-to-settle time of one batch, µs. */
  avgLatencyUs: number;
  /** Wall time per descriptor: building the lists, posting, completion in JS, ns. */
  nsPerDescriptor: number;
  prepUs: { p50: number; p99: number };
  postUs: { p50: number; p99: number };
  transferUs: { p50: number; p99: number };
  vs: {
    perftest: { test: string; ratio: number | null; skipped?: string; pairwiseBaseline?: true };
    /**
     * tag_bw cells: the same ucx_perftest with peer error handling (`-e`), as kvwire's endpoints have
     * it: UCX then opens RMA lanes only where it can revoke a peer's access (not cma, not
     * tcp): rendezvous over active messages on one interface. Run with kvwire's settings (UCX_MM_ERROR_HANDLING
     * on shared memory, 64 KiB tcp send segments); skipped, saying why, where ucx_perftest has no `-e`.
     */
    perftestErrh?: { test: string; ratio: number | null; skipped?: string; pairwiseBaseline?: true };
    socket: { ratio: number | null; skipped?: string };
    memcpy: { ratio: number | null; skipped?: string };
    /** With `--baseline nixl`: kvwire ÷ NIXL on the same transport, op, block and batch (DRAM both sides). */
    nixl?: { ratio: number | null; gbps?: number; skipped?: string };
  };
}

export interface BenchResult {
  kvwire: string;
  ucx: string;
  node: string;
  machine: { cpus: number; model: string; memoryGiB: number };
  startedAt: string;
  options: Omit<BenchOptions, 'json' | 'svg'>;
  remote: boolean;
  cells: Cell[];
  baselines: {
    perftest: (PerftestResult & { transport: Transport; memory: MemoryKind; op: Op; block: number })[];
    /** tag_bw with `-e` (peer error handling), per (transport, memory, block) of tag_bw cells. */
    perftestErrh: (PerftestResult & { transport: Transport; memory: MemoryKind; block: number })[];
    socket: ({ op: Op; block: number; gbps: number; runs: number[] } | { op: Op; block: number; skipped: string })[];
    memcpy: { block: number; gbps: number; runs: number[] }[];
    /** One per (transport, op, block) with `--baseline nixl`; both memory kinds compare against it. */
    nixl: ({ transport: Transport; op: Op; block: number; batch: number } & NixlResult)[];
  };
  latency: { mode: 'event' | 'poll'; transport: Transport; memory?: 'vram'; size: number; p50Us: number; p99Us: number; samples: number }[];
  idle: { seconds: number; initiatorPercent: number; targetPercent: number } | null;
  targets: { id: string; case: string; target: string; measured: string; met: boolean | null }[];
  /** With VRAM cells: the CUDA driver they ran on (`testDouble` set: not a GPU). */
  cuda?: { driver?: string; version?: number; testDouble?: string; devices: string[] };
}

function summarize(r: RunResult[], cell: { block: number; batch: number }): Omit<Cell, 'transport' | 'memory' | 'pattern' | 'op' | 'block' | 'batch' | 'vs' | 'carriers'> {
  const runs = r[0].runs.length;
  const runsGbps: number[] = [];
  let descriptors = 0;
  let wall = 0;
  for (let i = 0; i < runs; i++) {
    const bytes = r.reduce((n, x) => n + x.runs[i].bytes, 0);
    const span = Math.max(...r.map((x) => x.runs[i].endUs)) - Math.min(...r.map((x) => x.runs[i].startUs));
    runsGbps.push(bytes / span / 1e3);
    descriptors += bytes / cell.block;
    wall += span;
  }
  const samples: BatchSample[] = r.flatMap((x) => x.samples);
  const pick = (k: keyof BatchSample) => {
    const v = samples.map((s) => s[k]);
    return { p50: round(percentile(v, 50), 1), p99: round(percentile(v, 99), 1) };
  };
  return {
    path: [...new Set(r.flatMap((x) => x.path.split('/')))].join('/'), // every initiator's paths
    gbps: round(median(runsGbps), 3),
    runsGbps: runsGbps.map((x) => round(x, 3)),
    avgLatencyUs: round(samples.reduce((n, s) => n + s.transferUs, 0) / samples.length, 1),
    // With several initiators the wall clock is shared, so this is per descriptor of the whole system.
    nsPerDescriptor: round((wall * 1e3) / descriptors, 1),
    prepUs: pick('prepUs'),
    postUs: pick('postUs'),
    transferUs: pick('transferUs'),
  };
}

/** Progress goes to stderr, so `--json` output on stdout stays clean. */
function log(text: string): void {
  process.stderr.write(`${text}\n`);
}

const transportsOf = (t: Transport) => (t === 'tcp' ? 'tcp' : 'shm,self');

/** The agent names of a group's processes (cellCarriers finds their connections by them). */
const initiatorName = (i: number) => `bench-init-${i}`;
const targetName = (i: number) => `bench-target-${i}`;

/** The agent options every bench process takes from the command line (cells, latency pair, remote end alike). */
const agentOptions = (opts: BenchOptions) => ({ progress: opts.progress, cma: opts.cma, progressThread: opts.progressThread });

/** The processes of one (transport, memory, pattern) group: initiators and targets. */
async function startGroup(opts: BenchOptions, t: Transport, memory: MemoryKind, pattern: Pattern, remote?: RemoteTarget) {
  const nInit = pattern === 'many-to-one' ? opts.fan : 1;
  const nTarget = remote ? 1 : pattern === 'one-to-many' ? opts.fan : 1;
  const maxArea = Math.max(...opts.blocks.map((b) => 2 * autoBatch(b, opts.batch) * b), 2 * DESCRIPTOR_CELL.batch * DESCRIPTOR_CELL.block);
  const base = { transports: transportsOf(t), ...agentOptions(opts), hugePages: opts.hugePages };
  const initiators = Array.from({ length: nInit }, (_, i) => new Node(`initiator-${i}`));
  const targets = remote ? [] : Array.from({ length: nTarget }, (_, i) => new Node(`target-${i}`));
  const all = [...initiators, ...targets];
  try {
    const targetInfo = remote
      ? [{ metadata: remote.metadata, socketPort: remote.socketPort }]
      : await Promise.all(
          targets.map((n, i) => n.call('init', { ...base, memory: memoryOf(memory, 'target'), name: targetName(i), regionBytes: maxArea * nInit, socketHost: '127.0.0.1' })),
        );
    await Promise.all(initiators.map((n, i) => n.call('init', { ...base, memory: memoryOf(memory, 'initiator'), name: initiatorName(i), regionBytes: maxArea * nTarget })));
    await Promise.all(initiators.map((n) => n.call('peers', { metadata: targetInfo.map((x: any) => x.metadata) })));
    return { initiators, targets, all, peerCount: targetInfo.length, socket: { host: remote?.host ?? '127.0.0.1', port: targetInfo[0].socketPort as number | undefined } };
  } catch (e) {
    await Promise.all(all.map((n) => n.exit()));
    throw e;
  }
}

/**
 * What carried a cell's blocks (see Cell.carriers): UCX's endpoint descriptions from initiator 0
 * (its connection to target 0) and target 0 (its connection to initiator 0), asked after the timed
 * runs, when every lane is wired up.
 */
async function cellCarriers(g: Awaited<ReturnType<typeof startGroup>>, path: string, op: Op, block: number, batch: number, memory: MemoryKind): Promise<Carrier[]> {
  const list = async (n: Node) => (await n.call<{ connections: ConnectionView[] }>('connections')).connections;
  const [outbound, inbound] = await Promise.all([list(g.initiators[0]), g.targets[0] ? list(g.targets[0]) : Promise.resolve(undefined)]);
  // The initiator's connection to target 0 (a remote target: its only one), the target's to initiator 0.
  const initiator = outbound.find((c) => c.direction === 'outbound' && (!g.targets[0] || c.peer === targetName(0)));
  const target = inbound?.find((c) => c.direction === 'inbound' && c.peer === initiatorName(0));
  const missing = {
    initiator: 'the initiator lists no connection to the target',
    target: inbound ? "the target lists no endpoint of its own to the initiator (it answered on UCX's reply endpoint)"
      : "the target is remote: its connections cannot be asked from here",
  };
  // The data messages' source: the initiator's region for WRITE, the target's for READ.
  const source = memoryOf(memory, op === 'write' ? 'initiator' : 'target');
  return carriersOf(path.split('/').filter(Boolean), op, block, batch, source === 'vram', initiator, target, missing);
}

async function runCell(opts: BenchOptions, g: Awaited<ReturnType<typeof startGroup>>, op: Op, block: number, batch: number): Promise<RunResult[]> {
  const startAtUs = wallUs() + 300_000 + g.initiators.length * 100_000; // after every initiator's warm-up
  return Promise.all(
    g.initiators.map((n, i) =>
      n.call<RunResult>('run', {
        op, block, batch, slots: slotsFor(opts, batch),
        peers: g.initiators.length === 1 ? Array.from({ length: g.peerCount }, (_, k) => k) : [0],
        remoteArea: i,
        runs: opts.runs, runMs: opts.runMs, startAtUs, path: opts.path, depth: opts.depth,
      }),
    ),
  );
}

interface RemoteTarget {
  metadata: string;
  memory: MemoryKind;
  host: string;
  socketPort?: number;
  perftestPort?: number;
}

function isVram(memory: MemoryKind): boolean {
  return memory === 'vram' || memory === 'vram-dram';
}

function ratio(x: number, base: { gbps?: number } | undefined): number | null {
  return base?.gbps ? round(x / base.gbps, 3) : null;
}

export async function runBench(opts: BenchOptions): Promise<number> {
  const remote: RemoteTarget | undefined = opts.peerFile ? JSON.parse(fs.readFileSync(opts.peerFile, 'utf8')) : undefined;
  if (remote && (opts.transports.join() !== 'tcp' || opts.patterns.join() !== 'pairwise'))
    throw new Error('with --peer, only --transport tcp and --pattern pairwise apply (the remote target serves one initiator)');
  if (remote && opts.memories.join() !== remote.memory)
    throw new Error(`--memory ${opts.memories.join()} does not match the remote target's ${remote.memory} region (start it with the same --memory)`);
  const result: BenchResult = {
    kvwire: require('../../package.json').version,
    ucx: ucxVersion(),
    node: process.version,
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model ?? 'unknown', memoryGiB: Math.round(os.totalmem() / 2 ** 30) },
    startedAt: new Date().toISOString(),
    options: { ...opts, json: undefined, svg: undefined } as BenchResult['options'],
    remote: !!remote,
    cells: [],
    baselines: { perftest: [], perftestErrh: [], socket: [], memcpy: [], nixl: [] },
    latency: [],
    idle: null,
    targets: [],
  };
  const groups = opts.transports.flatMap((t) => opts.memories.flatMap((m) => opts.patterns.map((p) => [t, m, p] as const)));
  const perCell = opts.blocks.length * opts.ops.length;
  const total = groups.length * perCell;
  log(`kvwire bench: ${total} cells (${opts.transports.join('/')} x ${opts.memories.join('/')} x ${opts.patterns.join('/')} x ` +
    `${opts.ops.join('/')} x ${opts.blocks.length} block sizes), median of ${opts.runs} runs of >= ${opts.runMs} ms` +
    (opts.depth > 1 ? `, ${opts.depth} batches in flight per initiator` : '') +
    (remote ? `, remote target ${remote.host}` : '') + (opts.path !== 'auto' ? `, every timed batch by path '${opts.path}'` : ''));
  if (opts.memories.some(isVram)) {
    const c = cudaInfo();
    if (!c.available) throw new Error(`--memory ${opts.memories.filter(isVram).join(',')}: no CUDA (${c.reason})`);
    result.cuda = { driver: c.driver, version: c.version, testDouble: c.testDouble, devices: c.devices.map((d) => d.name) };
    log(c.testDouble ? `CUDA: TEST DOUBLE (${c.driver}) — VRAM cells time host memcpy through the double, not a GPU; their figures mean nothing`
      : `CUDA driver ${c.version}, device 0: ${c.devices[0]?.name}`);
  }
  let done = 0;
  const socketCache = new Map<string, BenchResult['baselines']['socket'][number]>();
  const memcpyCache = new Map<number, BenchResult['baselines']['memcpy'][number]>();
  const perftestCache = new Map<string, PerftestResult>();
  const perftestAbsent = opts.baselines ? perftestMissing() : undefined; // why no ucx_perftest runs here
  const errhSupported = opts.baselines && !perftestAbsent && perftestErrorHandling();
  const nixlWanted = opts.extraBaselines.includes('nixl');
  const nixlCache = new Map<string, NixlResult>();
  let nixlOff: string | undefined; // why no NIXL cell can run at all
  if (nixlWanted) {
    const probe = remote ? undefined : await probeNixl();
    if (remote) nixlOff = 'NIXL baseline runs on one host only (not with --peer)';
    else if (probe && !probe.ok) nixlOff = probe.reason;
    if (probe?.ok)
      log(`NIXL baseline: ${probe.module} ${probe.version}, UCX backend (its own UCX), DRAM both sides, ` +
        (nixlProgress() === 'event' ? 'progress thread waiting on events, 1 ms poll timeout' : 'progress thread spinning (poll timeout 0)'));
    else log(`NIXL baseline skipped: ${nixlOff}${probe && !probe.ok && probe.detail ? ` (${probe.detail})` : ''}`);
  }
  for (const [t, memory, pattern] of groups) {
    const g = await startGroup(opts, t, memory, pattern, remote);
    try {
      for (const block of opts.blocks) {
        const batch = autoBatch(block, opts.batch);
        if (opts.baselines && !memcpyCache.has(block)) {
          const m = await g.initiators[0].call('memcpy', { block, batch, slots: slotsFor(opts, batch), runs: opts.runs, runMs: opts.runMs });
          memcpyCache.set(block, { block, gbps: round(median(m.gbps), 3), runs: m.gbps.map((x: number) => round(x, 3)) });
        }
        for (const op of opts.ops) {
          const s = summarize(await runCell(opts, g, op, block, batch), { block, batch });
          const carriers = await cellCarriers(g, s.path, op, block, batch, memory);
          const key = `${op}:${block}`;
          if (opts.baselines && !socketCache.has(key) && g.socket.port && !isVram(memory)) {
            const m = await g.initiators[0].call('socket', { ...g.socket, op, block, batch, slots: slotsFor(opts, batch), runs: opts.runs, runMs: opts.runMs });
            socketCache.set(key, { op, block, gbps: round(median(m.gbps), 3), runs: m.gbps.map((x: number) => round(x, 3)) });
          }
          let pt: PerftestResult | undefined;
          let ptErrh: PerftestResult | undefined;
          if (opts.baselines) {
            const spec = perftestFor(t, memory, op);
            // tag_bw does not depend on the op: READ and WRITE of one memory kind share one measurement.
            const key = `${t}|${spec.test}|${JSON.stringify(spec.env)}|${spec.memArgs?.join(' ') ?? ''}|${block}`;
            pt = perftestCache.get(key);
            if (!pt) {
              pt = remote && !remote.perftestPort
                ? { test: spec.test, skipped: 'the remote target runs no ucx_perftest server' }
                : await perftest({ ...spec, transports: transportsOf(t), block, runs: opts.runs,
                    remote: remote?.perftestPort ? { host: remote.host, port: remote.perftestPort } : undefined });
              perftestCache.set(key, pt);
            }
            if (!result.baselines.perftest.some((x) => x.transport === t && x.memory === memory && x.op === op && x.block === block))
              result.baselines.perftest.push({ ...pt, transport: t, memory, op, block });
            if (spec.test === 'tag_bw' && !isVram(memory)) {
              const ekey = `${key}|-e`;
              ptErrh = perftestCache.get(ekey);
              if (!ptErrh) {
                // kvwire's endpoint settings: peer error handling (on shared memory with UCX_MM_ERROR_HANDLING,
                // as kvwire sets it), and over tcp its 64 KiB send segments.
                const label = 'tag_bw -e';
                ptErrh = remote ? { test: label, skipped: 'runs on one host only (not with --peer)' }
                  : perftestAbsent ? { test: label, skipped: perftestAbsent }
                  : !errhSupported ? { test: label, skipped: 'this ucx_perftest has no -e (endpoints with peer error handling)' }
                  : await perftest({ ...spec, label, env: { ...spec.env, ...(t === 'tcp' ? { UCX_TCP_TX_SEG_SIZE: '64k' } : { UCX_MM_ERROR_HANDLING: 'y' }) },
                      errorHandling: true, transports: transportsOf(t), block, runs: opts.runs });
                perftestCache.set(ekey, ptErrh);
                result.baselines.perftestErrh.push({ ...ptErrh, transport: t, memory, block });
              }
            }
          }
          let nx: Cell['vs']['nixl'];
          if (nixlWanted) {
            if (nixlOff) nx = { ratio: null, skipped: nixlOff };
            else if (isVram(memory)) nx = { ratio: null, skipped: 'the NIXL baseline here moves host memory only' };
            else if (pattern !== 'pairwise') nx = { ratio: null, skipped: 'NIXL baseline runs pairwise only' };
            else {
              // NIXL has one kind of host memory: both kvwire memory kinds compare against one measurement.
              const key = `${t}|${op}|${block}`;
              let n = nixlCache.get(key);
              if (!n) {
                n = await nixlCell({ transport: t, op, block, batch, slots: slotsFor(opts, batch), runs: opts.runs, runMs: opts.runMs });
                nixlCache.set(key, n);
                result.baselines.nixl.push({ transport: t, op, block, batch, ...n });
                log(`    NIXL ${t} ${op.toUpperCase()} ${formatSize(block)} x ${batch}: ` +
                  ('gbps' in n ? `${n.gbps.toFixed(2)} GB/s (runs ${n.runs.map((x) => x.toFixed(2)).join(', ')})` : `skipped: ${n.skipped}`));
              }
              nx = 'gbps' in n ? { ratio: ratio(s.gbps, n), gbps: round(n.gbps, 3) } : { ratio: null, skipped: n.skipped };
            }
          }
          const sock = socketCache.get(`${op}:${block}`);
          const mc = memcpyCache.get(block);
          const skipped = opts.baselines ? undefined : 'baselines off (--no-baselines)';
          const cell: Cell = {
            transport: t, memory, pattern, op, block, batch, ...s, carriers,
            vs: {
              perftest: pt
                ? { test: pt.test, ratio: ratio(s.gbps, pt as any), ...('skipped' in pt ? { skipped: pt.skipped } : {}), ...(pattern !== 'pairwise' ? { pairwiseBaseline: true as const } : {}) }
                : { test: 'none', ratio: null, skipped },
              ...(ptErrh ? { perftestErrh: { test: ptErrh.test, ratio: ratio(s.gbps, ptErrh as any), ...('skipped' in ptErrh ? { skipped: ptErrh.skipped } : {}),
                ...(pattern !== 'pairwise' ? { pairwiseBaseline: true as const } : {}) } } : {}),
              socket: sock && 'gbps' in sock ? { ratio: ratio(s.gbps, sock) } : { ratio: null, skipped: skipped ?? (sock as any)?.skipped ?? 'no socket server' },
              memcpy: mc ? { ratio: ratio(s.gbps, mc) } : { ratio: null, skipped },
              ...(nx ? { nixl: nx } : {}),
            },
          };
          result.cells.push(cell);
          done++;
          const pr = cell.vs.perftest.ratio;
          log(`  [${String(done).padStart(String(total).length)}/${total}] ${t} ${memory} ${pattern} ${op.toUpperCase()} ` +
            `${formatSize(block)} x ${batch}: ${cell.gbps.toFixed(2)} GB/s (${cell.path})` +
            (pr !== null ? `, ${Math.round(pr * 100)}% of ${cell.vs.perftest.test}` : '') +
            (cell.vs.perftestErrh?.ratio != null ? ` (${Math.round(cell.vs.perftestErrh.ratio * 100)}% of tag_bw -e)` : '') +
            (nx?.ratio != null ? `, ${nx.ratio.toFixed(2)}x NIXL` : '') +
            cell.carriers.map((c) => `\n        ${carrierText(c)}`).join(''));
        }
      }
      if (pattern === 'pairwise' && t === 'shm') {
        // Per-descriptor overhead: 10,000 x 64 B in one batch (T4).
        const { block, batch } = DESCRIPTOR_CELL;
        const s = summarize(await runCell(opts, g, 'write', block, batch), { block, batch });
        const carriers = await cellCarriers(g, s.path, 'write', block, batch, memory);
        result.cells.push({ transport: t, memory, pattern, op: 'write', block, batch, ...s, carriers,
          vs: { perftest: { test: 'none', ratio: null, skipped: 'descriptor-rate cell' }, socket: { ratio: null, skipped: 'descriptor-rate cell' }, memcpy: { ratio: null, skipped: 'descriptor-rate cell' },
            ...(nixlWanted ? { nixl: { ratio: null, skipped: 'descriptor-rate cell' } } : {}) } });
        log(`  descriptor rate, ${t} ${memory}: ${batch} x ${block} B WRITE, ${s.nsPerDescriptor} ns per descriptor (${s.path})`);
      }
    } finally {
      await Promise.all(g.all.map((n) => n.exit()));
    }
  }
  result.baselines.socket = [...socketCache.values()];
  result.baselines.memcpy = [...memcpyCache.values()];
  if (nixlWanted && !result.baselines.nixl.length && nixlOff) result.baselines.nixl.push({ transport: opts.transports[0], op: opts.ops[0], block: opts.blocks[0], batch: autoBatch(opts.blocks[0], opts.batch), skipped: nixlOff });
  if (!remote && (opts.latencySamples > 0 || opts.idleSeconds > 0)) await latencyAndIdle(opts, result);
  result.targets = verdicts(result);
  if (opts.svg) {
    fs.mkdirSync(path.dirname(path.resolve(opts.svg)), { recursive: true });
    fs.writeFileSync(opts.svg, chartSvg(result));
    log(`chart written to ${opts.svg}`);
  }
  if (opts.json) console.log(JSON.stringify(result, null, 1));
  else printTables(result);
  return 0;
}

async function latencyAndIdle(opts: BenchOptions, result: BenchResult): Promise<void> {
  for (const mode of ['event', 'poll'] as const) {
    if (mode === 'poll' && opts.latencySamples === 0) break;
    await latencyPair(opts, result, mode, 'allocated');
    if (opts.latencySamples > 0 && opts.memories.includes('vram')) await latencyPair(opts, result, mode, 'vram');
  }
}

/**
 * Two agents of `memory` (host: kvwire-allocated; vram: path cuda_ipc, G5) ping-pong 4 KiB WRITEs,
 * each seen by the other's JS through its notification; with host memory in event mode, the idle
 * CPU of the connected pair too.
 */
async function latencyPair(opts: BenchOptions, result: BenchResult, mode: 'event' | 'poll', memory: 'allocated' | 'vram'): Promise<void> {
  const t = opts.transports[0];
  const tag = memory === 'vram' ? '-vram' : '';
  const a = new Node(`latency${tag}-a`);
  const b = new Node(`latency${tag}-b`);
  try {
    const base = { transports: transportsOf(t), memory, regionBytes: 1 << 20, ...agentOptions(opts), progress: mode };
    const [ia, ib] = await Promise.all([a.call('init', { ...base, name: `lat${tag}-a` }), b.call('init', { ...base, name: `lat${tag}-b` })]);
    await Promise.all([a.call('peers', { metadata: [ib.metadata] }), b.call('peers', { metadata: [ia.metadata] })]);
    if (opts.latencySamples > 0) {
      await b.call('pingPong', { size: 4096, samples: 0, serve: true });
      const { oneWayUs } = await a.call('pingPong', { size: 4096, samples: opts.latencySamples, serve: false });
      result.latency.push({ mode, transport: t, ...(memory === 'vram' ? { memory } : {}), size: 4096,
        p50Us: round(median(oneWayUs), 1), p99Us: round(percentile(oneWayUs, 99), 1), samples: oneWayUs.length });
      log(`  latency, ${mode} mode: 4 KiB ${memory === 'vram' ? 'VRAM WRITE (cuda_ipc)' : 'WRITE'} + notification seen in JS, ` +
        `one way ${round(median(oneWayUs), 1)} µs p50`);
    }
    if (memory === 'allocated' && mode === 'event' && opts.idleSeconds > 0) {
      log(`  idle CPU with a connected peer, ${opts.idleSeconds} s ...`);
      const [x, y] = await Promise.all([a.call('idleCpu', { seconds: opts.idleSeconds }), b.call('idleCpu', { seconds: opts.idleSeconds })]);
      result.idle = { seconds: opts.idleSeconds, initiatorPercent: round(x.percent, 3), targetPercent: round(y.percent, 3) };
    }
  } finally {
    await Promise.all([a.exit(), b.exit()]);
  }
}

function verdicts(r: BenchResult): BenchResult['targets'] {
  const out: BenchResult['targets'] = [];
  const pct = (x: number) => `${Math.round(x * 100)}%`;
  const ratios = (cells: Cell[], k: 'perftest' | 'socket') => cells.map((c) => c.vs[k].ratio).filter((x): x is number => x !== null);
  const pair = r.cells.filter((c) => c.pattern === 'pairwise' && c.block !== DESCRIPTOR_CELL.block);
  const mib1to4 = (c: Cell) => c.block >= 1 << 20 && c.block <= 4 << 20;
  const add = (id: string, what: string, target: string, values: number[], ok: (min: number) => boolean, show = pct) =>
    out.push({ id, case: what, target, measured: values.length ? `min ${show(Math.min(...values))}, median ${show(median(values))} (${values.length} cells)` : 'not measured in this run', met: values.length ? ok(Math.min(...values)) : null });
  if (!r.remote) {
    add('T1', 'allocated memory, same host, WRITE+READ, 1-4 MiB', '>= 90% of ucp_put_bw / ucp_get',
      ratios(pair.filter((c) => c.transport === 'shm' && c.memory === 'allocated' && mib1to4(c)), 'perftest'), (m) => m >= 0.9);
    const reg = pair.filter((c) => c.transport === 'shm' && c.memory === 'registered');
    const big = ratios(reg.filter((c) => c.block >= 64 << 10), 'perftest');
    const all = ratios(reg, 'perftest');
    out.push({ id: 'T2', case: 'registered Buffers, same host, >= 64 KiB (no size below 50%)', target: '>= 90% of tag_bw; none < 50%',
      measured: big.length ? `>= 64 KiB: min ${pct(Math.min(...big))}, median ${pct(median(big))}; all sizes: min ${pct(Math.min(...all))}` : 'not measured in this run',
      met: big.length ? Math.min(...big) >= 0.9 && Math.min(...all) >= 0.5 : null });
  } else {
    add('T3', 'tcp between two hosts, 1-4 MiB', '>= 90% of tag_bw over tcp',
      ratios(pair.filter(mib1to4), 'perftest'), (m) => m >= 0.9);
  }
  // P2 (issue 10, for UCX 1.22): tcp 1-4 MiB against tag_bw of the same UCX and a Node socket, and
  // (shown, not judged) against tag_bw with peer error handling (-e), the endpoint mode kvwire runs in.
  // A remote run judges the same cells as T3.
  const tcpBig = pair.filter((c) => c.transport === 'tcp' && mib1to4(c));
  if (!r.remote && tcpBig.length) {
    const plain = ratios(tcpBig, 'perftest');
    const sock = ratios(tcpBig, 'socket');
    const errh = tcpBig.map((c) => c.vs.perftestErrh?.ratio).filter((x): x is number => typeof x === 'number');
    const why = (k: 'perftest' | 'perftestErrh' | 'socket') => tcpBig.map((c) => c.vs[k]?.skipped).find((x) => x) ?? 'no such cell';
    const range = (v: number[], show: (x: number) => string) => `min ${show(Math.min(...v))}, median ${show(median(v))}`;
    out.push({ id: 'P2', case: `tcp, 1-4 MiB (UCX ${r.ucx}; the issue's P2 is for UCX 1.22)`, target: '>= 90% of tag_bw (same UCX) and >= 2x a Node socket',
      measured: `tag_bw: ${plain.length ? `${range(plain, pct)} (${plain.length} cells)` : `not measured (${why('perftest')})`}; ` +
        `socket: ${sock.length ? range(sock, (x) => `${x.toFixed(1)}x`) : `not measured (${why('socket')})`}; ` +
        `tag_bw -e (peer error handling, as kvwire): ${errh.length ? range(errh, pct) : `not measured (${why('perftestErrh')})`}`,
      met: plain.length && sock.length ? Math.min(...plain) >= 0.9 && Math.min(...sock) >= 2 : null });
  }
  for (const memory of ['allocated', 'registered'] as const) {
    const cells = r.cells.filter((c) => c.memory === memory && c.block === DESCRIPTOR_CELL.block && c.batch === DESCRIPTOR_CELL.batch);
    const paths = [...new Set(cells.flatMap((c) => c.path.split('/')))].join('/');
    if (cells.length) add('T4', `10,000 x 64 B in one batch, ${memory} (path ${paths}${paths.includes('am') ? ', wire included' : ''}), post to completion in JS`,
      '<= 200 ns per descriptor', cells.map((c) => c.nsPerDescriptor), (m) => m <= 200, (x) => `${x} ns`);
  }
  // GPU targets (issue 9): same host, two processes.
  const vram = pair.filter((c) => c.memory === 'vram');
  add('G1', 'VRAM<->VRAM, 1-4 MiB blocks, WRITE and READ', '>= 90% of ucx_perftest ucp_put_bw -m cuda,cuda',
    ratios(vram.filter(mib1to4), 'perftest'), (m) => m >= 0.9);
  for (const [block, floor] of [[4 << 10, 200], [64 << 10, 400]] as const)
    add('G2', `VRAM<->VRAM, ${formatSize(block)} blocks, ~16 MiB batches`, `>= ${floor} GB/s`,
      vram.filter((c) => c.block === block).map((c) => c.gbps), (m) => m >= floor, (x) => `${x} GB/s`);
  add('G3', 'DRAM<->VRAM across processes, >= 64 KiB blocks', '>= 45 GB/s',
    pair.filter((c) => c.memory === 'vram-dram' && c.block >= 64 << 10).map((c) => c.gbps), (m) => m >= 45, (x) => `${x} GB/s`);
  const vramRate = r.cells.filter((c) => c.memory === 'vram' && c.block === DESCRIPTOR_CELL.block && c.batch === DESCRIPTOR_CELL.batch).map((c) => c.nsPerDescriptor);
  if (vramRate.length) add('G4', '10,000 x 64 B VRAM descriptors, post to completion in JS', '<= 200 ns per descriptor', vramRate, (m) => m <= 200, (x) => `${x} ns`);
  for (const l of r.latency.filter((x) => x.memory === 'vram'))
    out.push({ id: 'G5', case: `4 KiB VRAM WRITE + notification seen by the target in JS, ${l.mode} mode`, target: '<= 30 µs p50',
      measured: `p50 ${l.p50Us} µs (p99 ${l.p99Us} µs)`, met: l.p50Us <= 30 });
  // Figures taken through the CUDA test double time host copies, not a GPU: no verdict from them.
  if (r.cuda?.testDouble)
    for (const v of out)
      if (v.id.startsWith('G') && v.met !== null) {
        v.met = null;
        v.measured += ' — CUDA test double, not a GPU: no verdict';
      }
  for (const l of r.latency.filter((x) => x.memory === undefined))
    out.push({ id: 'T5', case: `4 KiB WRITE + notification seen in JS, ${l.mode} mode`, target: l.mode === 'event' ? '<= 15 µs' : '<= 5 µs',
      measured: `p50 ${l.p50Us} µs (p99 ${l.p99Us} µs)`, met: l.p50Us <= (l.mode === 'event' ? 15 : 5) });
  if (r.idle)
    out.push({ id: 'T6', case: `idle agent with a connected peer, ${r.idle.seconds} s`, target: '< 1% of one core',
      measured: `initiator ${r.idle.initiatorPercent}%, target ${r.idle.targetPercent}%`, met: Math.max(r.idle.initiatorPercent, r.idle.targetPercent) < 1 });
  for (const t of r.options.transports)
    add('T7', `1 MiB blocks vs a Node net socket, same processes, kvwire over ${t}`, '>= 5x faster',
      ratios(pair.filter((c) => c.transport === t && c.block === 1 << 20), 'socket'), (m) => m >= 5, (x) => `${x.toFixed(1)}x`);
  if (r.options.extraBaselines?.includes('nixl'))
    add('P1', 'every cell vs NIXL (same run)', '>= 1.0x NIXL', pair.map((c) => c.vs.nixl?.ratio).filter((x): x is number => typeof x === 'number'),
      (m) => m >= 1, (x) => `${x.toFixed(2)}x`);
  return out;
}

function printTables(r: BenchResult): void {
  const fmt = (x: number | null) => (x === null ? 'n/a' : `${Math.round(x * 100)}%`);
  console.log(`kvwire bench — ${r.machine.cpus} x ${r.machine.model}, UCX ${r.ucx}, Node ${r.node}${r.remote ? ', remote target' : ''}`);
  console.table(
    r.cells.map((c) => ({
      transport: c.transport, memory: c.memory, pattern: c.pattern, op: c.op.toUpperCase(), block: formatSize(c.block), batch: c.batch, path: c.path,
      'GB/s': c.gbps, 'avg µs': c.avgLatencyUs, 'prep p50/p99': `${c.prepUs.p50}/${c.prepUs.p99}`, 'post p50/p99': `${c.postUs.p50}/${c.postUs.p99}`,
      'xfer p50/p99': `${c.transferUs.p50}/${c.transferUs.p99}`, 'ns/desc': c.nsPerDescriptor,
      'carried by': c.carriers.map(carrierSummary).join('; '),
      'vs perftest': c.vs.perftest.ratio === null ? 'n/a' : `${fmt(c.vs.perftest.ratio)} ${c.vs.perftest.test}`,
      ...(c.vs.perftestErrh ? { 'vs perftest -e': fmt(c.vs.perftestErrh.ratio) } : {}),
      'vs socket': c.vs.socket.ratio === null ? 'n/a' : `${c.vs.socket.ratio.toFixed(1)}x`, 'vs memcpy': fmt(c.vs.memcpy.ratio),
      ...(c.vs.nixl ? { 'NIXL GB/s': c.vs.nixl.gbps ?? 'n/a', 'vs NIXL': c.vs.nixl.ratio === null ? 'n/a' : `${c.vs.nixl.ratio.toFixed(2)}x` } : {}),
    })),
  );
  const nixlSkipped = new Set([...r.baselines.nixl.map((n) => ('skipped' in n ? n.skipped : undefined)),
    ...r.cells.filter((c) => c.batch !== DESCRIPTOR_CELL.batch).map((c) => c.vs.nixl?.skipped)].filter((x): x is string => !!x));
  for (const s of nixlSkipped) console.log(`NIXL column skipped: ${s}`);
  const nixlRun = r.baselines.nixl.find((n) => 'gbps' in n) as { progress: string; nixl: string } | undefined;
  if (nixlRun) console.log(`NIXL: ${nixlRun.nixl}, UCX backend, DRAM both sides, ${nixlRun.progress}; request prepared once per cell and reposted per batch`);
  const skipped = new Set(r.baselines.perftest.filter((p) => 'skipped' in p).map((p) => (p as any).skipped));
  for (const s of skipped) console.log(`perftest column skipped: ${s}`);
  const errhSkipped = new Set(r.baselines.perftestErrh.filter((p) => 'skipped' in p).map((p) => (p as any).skipped));
  for (const s of errhSkipped) console.log(`perftest -e column skipped: ${s}`);
  if (r.latency.length || r.idle) console.table([...r.latency.map((l) => ({ what: `4 KiB ${l.memory === 'vram' ? 'VRAM ' : ''}WRITE + notify, one way, ${l.mode}`, p50: `${l.p50Us} µs`, p99: `${l.p99Us} µs` })),
    ...(r.idle ? [{ what: `idle CPU, ${r.idle.seconds} s`, p50: `initiator ${r.idle.initiatorPercent}%`, p99: `target ${r.idle.targetPercent}%` }] : [])]);
  console.table(r.targets.map((t) => ({ id: t.id, case: t.case, target: t.target, measured: t.measured, met: t.met === null ? 'n/a' : t.met ? 'yes' : 'NO' })));
}

/**
 * `kvwire bench --serve FILE`: a standalone target for a remote initiator. Writes its metadata, the
 * socket-baseline port and a ucx_perftest server port to FILE, and serves until SIGINT/SIGTERM.
 */
export async function serveRemote(opts: BenchOptions, file: string, host: string): Promise<number> {
  if (opts.memories.length !== 1) throw new Error('--serve takes one --memory (allocated or registered)');
  const regionBytes = Math.max(...opts.blocks.map((b) => 2 * autoBatch(b, opts.batch) * b));
  const info = await initNode({ name: `bench-remote-${os.hostname()}`, transports: 'tcp', memory: opts.memories[0], regionBytes, ...agentOptions(opts), socketHost: host });
  const perftestPort = 20000 + Math.floor(Math.random() * 20000);
  const loop = perftestServerLoop(perftestPort, 'tcp');
  fs.writeFileSync(file, JSON.stringify({ metadata: info.metadata, memory: opts.memories[0], host, socketPort: info.socketPort, perftestPort: loop ? perftestPort : undefined }));
  log(`kvwire bench target: ${formatSize(regionBytes)} ${opts.memories[0]} region, description in ${file}; Ctrl-C to stop`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  loop?.stop();
  return 0;
}
