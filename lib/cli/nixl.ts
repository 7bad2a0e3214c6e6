// NIXL as a baseline of `kvwire bench --baseline nixl`: two Python processes (nixl-peer.py, a target
// and an initiator, each one NIXL agent with the UCX backend) move the same scattered blocks as a
// kvwire cell — same transport, block size, batch, layout, READ/WRITE, DRAM on both sides — and the
// initiator reports GB/s per run. Content is checked once per cell before anything is timed.
// Everything has a deadline: a hung or crashed NIXL makes the cell "skipped", never hangs the bench.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Op } from './bench-node';
import { median } from './stats';

export type NixlTransport = 'shm' | 'tcp';

export const NIXL_INSTALL = 'pip install --no-deps nixl-cu12 numpy';
export const NIXL_NOT_INSTALLED = `NIXL not installed (${NIXL_INSTALL})`;

export interface NixlCellSpec {
  transport: NixlTransport;
  op: Op;
  block: number;
  batch: number;
  /** Slots per side: 2 × batch ('spread' layout) or 1 ('hot'), as in kvwire's bench. */
  slots: number;
  runs: number;
  runMs: number;
}

export type NixlResult = { gbps: number; runs: number[]; progress: string; nixl: string } | { skipped: string };

/** The interpreter that runs NIXL: `KVWIRE_PYTHON`, default `python3`. */
export const nixlPython = (): string => process.env.KVWIRE_PYTHON || 'python3';

/**
 * NIXL's progress thread: 'event' (default) sleeps in poll() on UCX's event fds with a 1 ms
 * timeout; 'spin' is what NIXL's Python API sets (0 ms timeout: it spins a core, and on a 2-core
 * machine that is slower still). `KVWIRE_NIXL_PROGRESS=spin` selects it.
 */
export const nixlProgress = (): 'event' | 'spin' => (process.env.KVWIRE_NIXL_PROGRESS === 'spin' ? 'spin' : 'event');

/** nixl-peer.py: next to this file (copied to dist by the build), or in lib/cli of a checkout. */
export function peerScript(): string | undefined {
  return [path.join(__dirname, 'nixl-peer.py'), path.join(__dirname, '..', '..', 'lib', 'cli', 'nixl-peer.py')].find((p) => fs.existsSync(p));
}

const alive = new Set<ChildProcess>();
let exitHook = false;

/** One nixl-peer.py process: JSON lines out, JSON lines in, stderr kept for error messages. */
class Peer {
  readonly child: ChildProcess;
  #lines: string[] = [];
  #wake: (() => void) | undefined;
  #stderr = '';
  #exited: string | undefined;
  constructor(readonly role: string, script: string, env: NodeJS.ProcessEnv) {
    if (!exitHook) {
      exitHook = true;
      process.once('exit', () => alive.forEach((c) => c.kill('SIGKILL')));
    }
    this.child = spawn(nixlPython(), [script, role], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    alive.add(this.child);
    let partial = '';
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      const parts = (partial + d).split('\n');
      partial = parts.pop()!;
      this.#lines.push(...parts.filter((l) => l.trim()));
      this.#wake?.();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.#stderr = (this.#stderr + d).slice(-4096);
    });
    this.child.stdin!.on('error', () => {}); // a peer that died; its exit says why
    this.child.on('error', (e) => {
      this.#exited = (e as NodeJS.ErrnoException).code === 'ENOENT' ? `${nixlPython()} not found` : e.message;
      this.#wake?.();
    });
    this.child.on('exit', (code, signal) => {
      alive.delete(this.child);
      this.#exited ??= `${role} exited (${signal ?? `code ${code}`})${this.stderrTail() ? `: ${this.stderrTail()}` : ''}`;
      this.#wake?.();
    });
  }
  stderrTail(): string {
    const lines = this.#stderr.trim().split('\n').filter((l) => !/ NIXL INFO /.test(l));
    return lines.slice(-1)[0]?.slice(0, 300) ?? '';
  }
  send(msg: object): void {
    if (this.child.stdin!.writable) this.child.stdin!.write(`${JSON.stringify(msg)}\n`);
  }
  /** The next line from the peer, parsed; throws on timeout, exit, or `ok: false`. */
  async next(what: string, timeoutMs: number): Promise<any> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.#lines.shift();
      if (line !== undefined) {
        let m: any;
        try {
          m = JSON.parse(line);
        } catch {
          continue; // not ours
        }
        if (m.ok === false) throw new Error(`${this.role} ${what}: ${m.error ?? (m.bad !== undefined ? `${m.bad} of ${m.blocks} blocks hold the wrong bytes` : 'failed')}`);
        return m;
      }
      if (this.#exited) throw new Error(`${what}: ${this.#exited}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${this.role} ${what}: no answer in ${Math.round(timeoutMs / 1000)} s${this.stderrTail() ? ` (${this.stderrTail()})` : ''}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.#wake = undefined;
    }
  }
  call(msg: { cmd: string; [k: string]: unknown }, timeoutMs: number): Promise<any> {
    this.send(msg);
    return this.next(msg.cmd, timeoutMs);
  }
  /** Ask it to leave (it skips NIXL's teardown, which may crash), then make sure it has. */
  async close(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.send({ cmd: 'exit' });
      await Promise.race([new Promise((r) => this.child.once('exit', r)), new Promise((r) => setTimeout(r, 1000))]);
    }
    this.child.kill('SIGKILL');
    alive.delete(this.child);
  }
}

export type NixlProbe = { ok: true; module: string; version: string } | { ok: false; reason: string; detail: string };
let probed: Promise<NixlProbe> | undefined;

/** Whether NIXL's Python API (and numpy) can be imported; asked once per process. */
export function probeNixl(): Promise<NixlProbe> {
  probed ??= (async (): Promise<NixlProbe> => {
    const script = peerScript();
    if (!script) return { ok: false, reason: 'nixl-peer.py not found next to the bench (rebuild: npm run build:ts)', detail: '' };
    const p = new Peer('probe', script, process.env);
    try {
      const m = await p.next('probe', 60_000);
      return { ok: true, module: m.module, version: m.version };
    } catch (e) {
      const detail = (e as Error).message;
      return /no answer in/.test(detail) ? { ok: false, reason: `NIXL probe timed out (${detail})`, detail } : { ok: false, reason: NIXL_NOT_INSTALLED, detail };
    } finally {
      await p.close();
    }
  })();
  return probed;
}

/** UCX settings of a NIXL cell: the kvwire cell's transports; shm needs error handling on mm. */
function envFor(t: NixlTransport): NodeJS.ProcessEnv {
  return { ...process.env, UCX_TLS: t === 'tcp' ? 'tcp' : 'shm,self', ...(t === 'shm' ? { UCX_MM_ERROR_HANDLING: 'y' } : {}) };
}

// The two sides' fill patterns (a multiplier and a seed each) and scatter seeds, as in kvwire's
// bench: the initiator's blocks at scatter(slots, batch, 1), the target's at scatter(slots, batch, 2).
const INIT = { mult: 7, fill: 1, scatter: 1 };
const TARGET = { mult: 11, fill: 2, scatter: 2 };

/** Runs one cell with NIXL; `skipped` says why there is no figure. */
export async function nixlCell(c: NixlCellSpec): Promise<NixlResult> {
  const probe = await probeNixl();
  if (!probe.ok) return { skipped: probe.reason };
  const script = peerScript()!;
  const progress = nixlProgress();
  const env = envFor(c.transport);
  const target = new Peer('target', script, env);
  const initiator = new Peer('initiator', script, env);
  // Filling and registering up to 2 × 64 MiB takes a while on a busy 2-core machine; a batch has 30 s.
  const setupMs = 90_000;
  try {
    const init = { cmd: 'init', block: c.block, slots: c.slots, progress };
    const [t, i] = await Promise.all([
      target.call({ ...init, name: `kvwire-bench-nixl-target-${process.pid}`, mult: TARGET.mult, fill: TARGET.fill }, setupMs),
      initiator.call({ ...init, name: `kvwire-bench-nixl-init-${process.pid}`, mult: INIT.mult, fill: INIT.fill }, setupMs),
    ]);
    // One batch, then its destination checked: a baseline that moves the wrong bytes reports nothing.
    const src = c.op === 'read' ? TARGET : INIT;
    await initiator.call({ cmd: 'verify', metadata: t.metadata, remoteBase: t.base, batch: c.batch, op: c.op,
      localScatter: INIT.scatter, remoteScatter: TARGET.scatter, srcMult: src.mult, srcFill: src.fill }, setupMs);
    if (c.op === 'write')
      await target.call({ cmd: 'check', batch: c.batch, dstScatter: TARGET.scatter, srcScatter: INIT.scatter, srcMult: src.mult, srcFill: src.fill }, setupMs);
    initiator.send({ cmd: 'run', runs: c.runs, runMs: c.runMs });
    const runs: number[] = [];
    for (let r = 0; r < c.runs; r++) runs.push((await initiator.next('run', 3 * c.runMs + 100_000)).gbps);
    const delay = i.pthrDelayUs ? `${i.pthrDelayUs / 1000} ms poll timeout` : '0 ms poll timeout (spins)';
    return { gbps: median(runs), runs, progress: `progress thread, ${delay}`, nixl: `${probe.module} ${probe.version}` };
  } catch (e) {
    return { skipped: `NIXL failed: ${(e as Error).message}` };
  } finally {
    await Promise.all([target.close(), initiator.close()]);
  }
}
