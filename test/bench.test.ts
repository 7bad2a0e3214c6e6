// `kvwire bench` runs in the suite with a tiny sweep; its JSON is checked for shape and sanity (every
// cell moved bytes; every ratio is a number or says why it is missing). Timings are not asserted.
import { execFile, execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { perftestMissing } from '../lib/cli/baselines';
import type { BenchResult, Cell } from '../lib/cli/bench';

const cli = path.join(__dirname, '..', 'dist', 'cli', 'index.js');
const run = promisify(execFile);
const TINY = ['--block', '4K,64K', '--runs', '1', '--run-ms', '20'];

async function bench(...args: string[]): Promise<BenchResult> {
  return benchWith(process.env, ...args);
}

async function benchWith(env: NodeJS.ProcessEnv, ...args: string[]): Promise<BenchResult> {
  const { stdout } = await run(process.execPath, [cli, 'bench', '--json', ...args], { timeout: 150_000, maxBuffer: 16 << 20, env });
  return JSON.parse(stdout);
}

/** Whether NIXL's Python API imports here (the same probe `kvwire bench --baseline nixl` uses). */
function nixlImportable(): boolean {
  const r = spawnSync(process.env.KVWIRE_PYTHON || 'python3', [path.join(__dirname, '..', 'lib', 'cli', 'nixl-peer.py'), 'probe'], { encoding: 'utf8', timeout: 60_000 });
  try {
    return JSON.parse(r.stdout).ok === true;
  } catch {
    return false;
  }
}

const NIXL_TINY = ['--transport', 'shm', '--memory', 'registered', '--op', 'write,read', '--block', '64K', '--runs', '1', '--run-ms', '100',
  '--no-baselines', '--latency-samples', '0', '--idle-seconds', '0', '--baseline', 'nixl'];

function expectSaneCell(c: Cell, remote = false): void {
  expect(c.gbps).toBeGreaterThan(0);
  expect(c.runsGbps.length).toBeGreaterThan(0);
  expect(['direct', 'am', 'rma', 'cma']).toContain(c.path);
  for (const k of ['prepUs', 'postUs', 'transferUs'] as const) {
    expect(c[k].p50).toBeGreaterThanOrEqual(0);
    expect(c[k].p99).toBeGreaterThanOrEqual(c[k].p50);
  }
  // One carrier per path the timed batches took: kvwire's own copy, or UCX's protocol for the data
  // messages, read from the endpoint of the side that sends them (both sides are local here).
  expect(c.carriers.map((x) => x.path)).toEqual(c.path.split('/'));
  for (const x of c.carriers) {
    expect(x.by).toBe(x.path === 'am' || x.path === 'rma' ? 'ucx' : 'kvwire');
    if (x.by === 'ucx' && remote && c.op === 'read') {
      // READ data leaves the remote target, whose connections this initiator cannot ask.
      expect(x.protocol).toBe('unknown');
      expect(x.unknown).toMatch(/target is remote/);
    } else if (x.by === 'ucx') {
      expect(x.unknown, JSON.stringify(x)).toBeUndefined();
      expect(x.protocol).not.toBe('unknown');
      expect(x.side).toBe(c.op === 'write' ? 'initiator' : 'target');
      expect(x.lanes).toMatch(c.transport === 'tcp' ? /tcp\// : /(sysv|posix|cma)\//);
      // One block and kvwire's header per message; small blocks packed, up to 8 KiB of payload.
      if (c.block > 1024) expect(x.messageBytes! - c.block).toBe(c.op === 'write' ? 32 : 12);
      else expect(x.messageBytes!).toBeLessThanOrEqual(16 + 8192);
    }
  }
  expect(c.avgLatencyUs).toBeGreaterThan(0);
  expect(c.nsPerDescriptor).toBeGreaterThan(0);
  for (const v of Object.values(c.vs)) {
    // A ratio, or an explicit reason why there is none — never a silent gap.
    if (v.ratio === null) expect(typeof v.skipped).toBe('string');
    else expect(v.ratio).toBeGreaterThan(0);
  }
}

describe('kvwire bench', () => {
  it('sweeps both memory kinds and ops on shm and tcp, with baselines, latency, idle CPU, targets and a chart', async () => {
    const svg = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'kvwire-bench-')), 'chart.svg');
    const r = await bench(...TINY, '--latency-samples', '20', '--idle-seconds', '1', '--svg', svg);
    const sweep = r.cells.filter((c) => c.batch !== 10_000);
    expect(sweep).toHaveLength(2 * 2 * 2 * 2); // transport x memory x op x block
    for (const t of ['shm', 'tcp'])
      for (const m of ['allocated', 'registered'])
        for (const op of ['write', 'read'])
          for (const block of [4096, 65536])
            expect(sweep.filter((c) => c.transport === t && c.memory === m && c.op === op && c.block === block)).toHaveLength(1);
    for (const c of r.cells) expectSaneCell(c);
    // kvwire maps a same-host peer's allocated region; user Buffers go by active messages.
    expect(sweep.find((c) => c.transport === 'shm' && c.memory === 'allocated')!.path).toBe('direct');
    expect(sweep.find((c) => c.memory === 'registered')!.path).toBe('am');
    // Descriptor-rate cells (T4) for both memory kinds on shm.
    expect(r.cells.filter((c) => c.batch === 10_000 && c.block === 64)).toHaveLength(2);
    // Baselines: one perftest entry per (transport, memory, op, block); the right test for each.
    expect(r.baselines.perftest).toHaveLength(16);
    for (const p of r.baselines.perftest) {
      if ('gbps' in p) expect(p.gbps).toBeGreaterThan(0);
      else expect(p.skipped).toMatch(/ucx_perftest/);
      const expected = p.transport === 'shm' && p.memory === 'allocated' ? (p.op === 'write' ? 'ucp_put_bw' : 'ucp_get') : 'tag_bw';
      expect(p.test).toBe(expected);
    }
    // tag_bw cells also compare against tag_bw -e (peer error handling, kvwire's endpoint mode).
    for (const c of sweep) expect(c.vs.perftestErrh !== undefined).toBe(c.vs.perftest.test === 'tag_bw');
    expect(r.baselines.perftestErrh.length).toBeGreaterThan(0);
    for (const p of r.baselines.perftestErrh) expect(p.test).toBe('tag_bw -e');
    expect(r.baselines.socket).toHaveLength(4);
    for (const s of r.baselines.socket) expect('gbps' in s && s.gbps > 0).toBe(true);
    expect(r.baselines.memcpy.map((m) => m.block)).toEqual([4096, 65536]);
    expect(r.latency.map((l) => l.mode)).toEqual(['event', 'poll']);
    for (const l of r.latency) expect(l.p50Us).toBeGreaterThan(0);
    expect(r.idle!.initiatorPercent).toBeGreaterThanOrEqual(0);
    expect(r.targets.map((t) => t.id)).toEqual(expect.arrayContaining(['T1', 'T2', 'T4', 'T5', 'T6', 'T7']));
    for (const t of r.targets) expect(t.met === null || typeof t.met === 'boolean').toBe(true);
    const chart = fs.readFileSync(svg, 'utf8');
    expect(chart.startsWith('<svg')).toBe(true);
    expect(chart).toContain('kvwire allocated write');
    expect(chart).toContain('Node net socket write');
  }, 180_000);

  it('runs the many-to-one and one-to-many patterns with aggregate bandwidth (hot layout)', async () => {
    const r = await bench('--block', '64K', '--runs', '1', '--run-ms', '20', '--transport', 'shm', '--memory', 'registered', '--layout', 'hot',
      '--pattern', 'many-to-one,one-to-many', '--no-baselines', '--latency-samples', '0', '--idle-seconds', '0');
    expect(r.options.layout).toBe('hot');
    expect(r.cells.map((c) => `${c.pattern} ${c.op}`).sort()).toEqual(['many-to-one read', 'many-to-one write', 'one-to-many read', 'one-to-many write']);
    for (const c of r.cells) {
      expectSaneCell(c);
      expect(c.vs.perftest.skipped).toMatch(/baselines off/);
    }
  }, 120_000);

  it('--path: every timed batch asks for that path (registered memory on shm by am and by cma at one size)', async () => {
    const common = ['--block', '64K', '--runs', '1', '--run-ms', '20', '--transport', 'shm', '--memory', 'registered', '--op', 'write',
      '--no-baselines', '--latency-samples', '0', '--idle-seconds', '0'];
    for (const p of ['am', 'cma']) {
      const r = await bench(...common, '--path', p);
      const cells = r.cells.filter((c) => c.batch !== 10_000);
      expect(cells.length).toBe(1);
      expect(cells[0].path).toBe(p);
      expectSaneCell(cells[0]);
    }
  }, 120_000);

  it('P2: tcp 1 MiB against tag_bw, a Node socket and tag_bw -e (peer error handling, as kvwire runs) of the same UCX', async () => {
    const r = await bench('--transport', 'tcp', '--memory', 'registered', '--op', 'write', '--block', '1M', '--runs', '1', '--run-ms', '20',
      '--latency-samples', '0', '--idle-seconds', '0');
    const [c] = r.cells;
    expectSaneCell(c);
    expect(c.vs.perftest.test).toBe('tag_bw');
    expect(c.vs.perftestErrh?.test).toBe('tag_bw -e');
    const p2 = r.targets.find((t) => t.id === 'P2')!;
    expect(p2.case).toMatch(new RegExp(`UCX ${r.ucx.replace(/\./g, '\\.')}`));
    if (perftestMissing()) {
      // Without ucx_perftest both columns say why, and P2 has no verdict.
      expect(c.vs.perftestErrh!.skipped).toMatch(/ucx_perftest/);
      expect(p2.measured).toMatch(/tag_bw: not measured .*tag_bw -e .*not measured/);
      expect(p2.met).toBeNull();
      return;
    }
    expect(c.vs.perftestErrh!.ratio).toBeGreaterThan(0); // ucx_perftest has -e (UCX 1.13 and 1.22)
    expect(p2.measured).toMatch(/^tag_bw: min \d+%.*; socket: min [\d.]+x.*; tag_bw -e \(peer error handling, as kvwire\): min \d+%/);
    expect(p2.met).toBe(c.vs.perftest.ratio! >= 0.9 && c.vs.socket.ratio! >= 2);
  }, 120_000);

  it('--depth: several batches in flight per initiator, every one of their bytes counted', async () => {
    const common = ['--transport', 'shm', '--memory', 'allocated', '--op', 'write', '--block', '64K', '--runs', '1', '--run-ms', '100',
      '--no-baselines', '--latency-samples', '0', '--idle-seconds', '0'];
    for (const depth of [1, 4]) {
      const r = await bench(...common, '--depth', String(depth));
      expect(r.options.depth).toBe(depth);
      const c = r.cells.find((x) => x.block === 65536)!;
      expectSaneCell(c);
      // With `depth` batches always in flight, throughput is about depth x one batch's bytes over
      // its mean time (the gaps between batches make it less): a count that lost the bytes of
      // concurrent batches would come out near 1 / depth of that.
      const inFlight = (depth * c.block * c.batch) / (c.avgLatencyUs * 1e3);
      expect(c.gbps, JSON.stringify({ depth, gbps: c.gbps, inFlight })).toBeGreaterThan(0.5 * inFlight);
      expect(c.gbps).toBeLessThan(1.5 * inFlight);
    }
  }, 120_000);

  it('joins a remote target from its description file (--serve / --peer)', async () => {
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'kvwire-serve-')), 'target.json');
    const server = spawn(process.execPath, [cli, 'bench', '--serve', file, '--host', '127.0.0.1', '--block', '64K'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    server.stderr!.on('data', (d) => (stderr += d));
    try {
      for (let i = 0; i < 200 && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 50));
      expect(fs.existsSync(file), stderr).toBe(true);
      const r = await bench('--peer', file, '--block', '64K', '--runs', '1', '--run-ms', '20', '--memory', 'registered');
      expect(r.remote).toBe(true);
      expect(r.cells).toHaveLength(2);
      for (const c of r.cells) {
        expectSaneCell(c, true);
        expect(c.transport).toBe('tcp');
      }
      expect(r.baselines.socket).toHaveLength(2);
      expect(r.targets.map((t) => t.id)).toContain('T3');
    } finally {
      server.kill('SIGTERM');
    }
    const code = await new Promise((r) => server.once('exit', r));
    expect(code).toBe(0);
  }, 120_000);

  it('--baseline nixl: kvwire ÷ NIXL per cell when NIXL imports, else every cell says why not', async () => {
    const r = await bench(...NIXL_TINY);
    expect(r.options.extraBaselines).toEqual(['nixl']);
    const sweep = r.cells.filter((c) => c.batch !== 10_000);
    expect(sweep).toHaveLength(2);
    const p1 = r.targets.find((t) => t.id === 'P1')!;
    expect(p1.target).toBe('>= 1.0x NIXL');
    if (nixlImportable()) {
      // One NIXL measurement per (transport, op, block), content checked before it was timed.
      expect(r.baselines.nixl.map((n) => `${n.transport} ${n.op} ${n.block}`).sort()).toEqual(['shm read 65536', 'shm write 65536']);
      for (const n of r.baselines.nixl) {
        expect('gbps' in n, JSON.stringify(n)).toBe(true);
        if ('gbps' in n) {
          expect(n.gbps).toBeGreaterThan(0);
          expect(n.progress).toMatch(/progress thread/);
        }
      }
      for (const c of sweep) {
        expect(c.vs.nixl!.ratio).toBeGreaterThan(0);
        expect(c.vs.nixl!.gbps).toBeGreaterThan(0);
      }
      expect(p1.met === true || p1.met === false).toBe(true);
    } else {
      for (const c of sweep) expect(c.vs.nixl!.skipped).toMatch(/NIXL not installed \(pip install --no-deps nixl-cu12 numpy\)/);
      expect(p1.met).toBeNull();
    }
    // The descriptor-rate cell has no NIXL counterpart, and says so.
    expect(r.cells.find((c) => c.batch === 10_000)!.vs.nixl).toEqual({ ratio: null, skipped: 'descriptor-rate cell' });
  }, 60_000);

  it('--baseline nixl without NIXL (no such interpreter): skipped with the install command, the bench still runs', async () => {
    const r = await benchWith({ ...process.env, KVWIRE_PYTHON: '/nonexistent/python3' }, ...NIXL_TINY);
    const sweep = r.cells.filter((c) => c.batch !== 10_000);
    expect(sweep).toHaveLength(2);
    for (const c of sweep) {
      expect(c.gbps).toBeGreaterThan(0);
      expect(c.vs.nixl).toEqual({ ratio: null, skipped: 'NIXL not installed (pip install --no-deps nixl-cu12 numpy)' });
    }
    expect(r.baselines.nixl.length).toBeGreaterThan(0);
    for (const n of r.baselines.nixl) expect('skipped' in n && n.skipped).toMatch(/NIXL not installed/);
    expect(r.targets.find((t) => t.id === 'P1')).toMatchObject({ measured: 'not measured in this run', met: null });
  }, 60_000);

  it('rejects bad options naming the option, with a non-zero exit', () => {
    for (const [args, message] of [
      [['--block', '3X'], /'3X' is not a size/],
      [['--transport', 'rdma'], /--transport: 'rdma' is not one of shm, tcp/],
      [['--runs', '0'], /--runs must be an integer >= 1/],
      [['--layout', 'cold'], /--layout takes one of spread, hot/],
      [['--serve', 'a', '--peer', 'b'], /--serve and --peer/],
      [['--baseline', 'bogus'], /--baseline: 'bogus' is not one of nixl/],
      [['--path', 'fast'], /--path takes one of auto, direct, am, rma, cma, cuda_ipc, not 'fast'/],
      [['--path', 'cma', '--cma', 'off'], /--path cma needs --cma on/],
      [['--path', 'cma', '--transport', 'tcp'], /--path cma needs --transport shm/],
      [['--depth', '0'], /--depth must be an integer >= 1/],
      [['--depth', '65'], /--depth must be 1 \.\. 64 batches in flight/],
    ] as const) {
      let status = 0;
      let stderr = '';
      try {
        execFileSync(process.execPath, [cli, 'bench', ...args], { encoding: 'utf8', stdio: 'pipe' });
      } catch (e) {
        status = (e as { status: number }).status;
        stderr = String((e as { stderr: string }).stderr);
      }
      expect(status).not.toBe(0);
      expect(stderr).toMatch(message);
    }
  });
});
