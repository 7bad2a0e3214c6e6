// The baselines `kvwire bench` reports kvwire against: ucx_perftest on the same transport, size and
// memory kind, run between two processes by this script (or against a remote `--serve` target).
import { spawn, spawnSync } from 'node:child_process';
import type { MemoryKind, Op } from './bench-node';
import { median } from './stats';

export type PerftestResult = { test: string; gbps: number; runs: number[] } | { test: string; skipped: string };

/**
 * The ucx_perftest test that does what kvwire does in this cell: one-sided put/get on UCX-allocated
 * buffers when kvwire can map the peer's allocated region (shared memory); otherwise tag_bw, which
 * is what an AM/rendezvous transfer of user memory costs.
 */
export function perftestFor(transport: string, memory: MemoryKind, op: Op): { test: string; env: Record<string, string>; memArgs?: string[] } {
  // VRAM: put_bw over cuda_ipc for both ops (UCX's get of cuda memory is software emulation, < 1 GB/s:
  // the G1 measures READ against put too); host<->VRAM: tag rendezvous (RMA mixing the two
  // is emulated as well).
  // UCX needs its CUDA transports in UCX_TLS even to recognise GPU memory.
  const cudaTls = { UCX_TLS: 'shm,self,cuda_copy,cuda_ipc' };
  if (memory === 'vram') return { test: 'ucp_put_bw', env: cudaTls, memArgs: ['-m', 'cuda,cuda'] };
  if (memory === 'vram-dram') return { test: 'tag_bw', env: cudaTls, memArgs: ['-m', 'cuda,host'] };
  if (memory === 'allocated' && transport === 'shm') return { test: op === 'write' ? 'ucp_put_bw' : 'ucp_get', env: {} };
  return { test: 'tag_bw', env: memory === 'registered' ? { UCX_ALLOC_PRIO: 'mmap,heap' } : {} };
}

/**
 * Whether this ucx_perftest can create its endpoints with peer error handling (`-e`; UCX 1.13 and 1.22 have it),
 * as kvwire creates its own: under it UCX opens RMA lanes only over memory domains that can revoke a
 * peer's access (not tcp, not cma), so its rendezvous runs over active messages on one interface;
 * tag_bw with `-e` is what UCX itself moves with a transport that must survive its peers' failures
 * (plain tag_bw may stripe RMA writes over several interfaces instead).
 */
export function perftestErrorHandling(): boolean {
  const r = spawnSync('ucx_perftest', ['-h'], { encoding: 'utf8' });
  return /-e\s+create endpoints with error handling/.test(`${r.stdout ?? ''}${r.stderr ?? ''}`);
}

export function perftestMissing(): string | undefined {
  const r = spawnSync('ucx_perftest', ['-h'], { stdio: 'ignore' });
  if ((r.error as NodeJS.ErrnoException | undefined)?.code === 'ENOENT') return 'ucx_perftest not installed (apt-get install ucx-utils)';
  return undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function runClient(args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn('ucx_perftest', args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** Overall bandwidth from ucx_perftest's `Final:` line (MB/s of 2^20 bytes), in GB/s of 1e9. */
function parseFinal(out: string): number | undefined {
  const final = out.split('\n').find((l) => l.startsWith('Final:'));
  const mbps = final ? Number(final.trim().split(/\s+/)[6]) : NaN;
  return Number.isFinite(mbps) ? (mbps * 2 ** 20) / 1e9 : undefined;
}

export interface PerftestSpec {
  test: string;
  env: Record<string, string>;
  transports: string;
  block: number;
  runs: number;
  /** ucx_perftest memory types (`-m cuda,cuda`) for GPU cells. */
  memArgs?: string[];
  /** `-e`: endpoints with peer error handling (see perftestErrorHandling). */
  errorHandling?: boolean;
  /** The name results and failures carry (default: `test`). */
  label?: string;
  /** A remote `kvwire bench --serve` target's perftest server; else one is started here per run. */
  remote?: { host: string; port: number };
}

export async function perftest(s: PerftestSpec): Promise<PerftestResult> {
  const name = s.label ?? s.test;
  const missing = perftestMissing();
  if (missing) return { test: name, skipped: missing };
  const env = { ...process.env, UCX_TLS: s.transports, ...s.env };
  // Enough bytes for a stable figure, bounded in time (emulated get over tcp is ~1 ms per message).
  const iterations = Math.max(10, Math.min(10_000, Math.floor((512 << 20) / s.block)));
  const rates: number[] = [];
  for (let r = 0; r < s.runs; r++) {
    let gbps: number | undefined;
    let why = '';
    for (let attempt = 0; attempt < 5 && gbps === undefined; attempt++) {
      const port = s.remote?.port ?? 20000 + Math.floor(Math.random() * 20000);
      const server = s.remote ? undefined : spawn('ucx_perftest', ['-p', String(port)], { env, stdio: 'ignore' });
      await sleep(s.remote ? 200 + attempt * 300 : 300);
      const args = [s.remote?.host ?? '127.0.0.1', '-p', String(port), '-t', s.test, '-s', String(s.block),
        '-n', String(iterations), '-w', String(Math.min(20, iterations)), ...(s.memArgs ?? []), ...(s.errorHandling ? ['-e'] : [])];
      const { code, out } = await runClient(args, env, 120_000);
      server?.kill('SIGKILL');
      gbps = code === 0 ? parseFinal(out) : undefined;
      if (gbps === undefined) why = `exit ${code}: ${out.trim().split('\n').slice(-1)[0] ?? ''}`;
    }
    if (gbps === undefined) return { test: name, skipped: `ucx_perftest ${name} failed (${why})` };
    rates.push(gbps);
  }
  return { test: name, gbps: median(rates), runs: rates };
}

/** Keeps a ucx_perftest server listening on `port` (each serves one test and exits). */
export function perftestServerLoop(port: number, transports: string): { stop(): void } | undefined {
  if (perftestMissing()) return undefined;
  let stopped = false;
  let child: ReturnType<typeof spawn> | undefined;
  const start = () => {
    if (stopped) return;
    child = spawn('ucx_perftest', ['-p', String(port)], {
      env: { ...process.env, UCX_TLS: transports, UCX_ALLOC_PRIO: 'mmap,heap' },
      stdio: 'ignore',
    });
    child.on('exit', () => setTimeout(start, 50));
  };
  start();
  return {
    stop() {
      stopped = true;
      child?.kill('SIGKILL');
    },
  };
}
