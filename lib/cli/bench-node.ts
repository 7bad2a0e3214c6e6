// One process of `kvwire bench`. As a target it owns a region (and a plain `net` server moving the
// same blocks, for the socket baseline); as an initiator it posts batches at one or more targets and
// reports per-batch timings. Driven over IPC by the orchestrator (bench.ts) — or, with `--serve`, a
// standalone target for a remote initiator (see `serveRemote`).
import * as net from 'node:net';
import { performance } from 'node:perf_hooks';
import { Agent } from '../agent';
import type { Region, RemoteRegion } from '../memory';
import type { TransferPath } from '../transfer';
import type { EndpointProtocols } from '../ucx-protocols';

export type Op = 'write' | 'read';
/**
 * allocated / registered: host memory both sides. vram: GPU memory both sides (device 0). vram-dram:
 * the initiator's GPU memory, the target's kvwire-allocated host memory (mapped by the initiator).
 */
export type MemoryKind = 'allocated' | 'registered' | 'vram' | 'vram-dram';
/** The region one side of a group holds. */
export function memoryOf(memory: MemoryKind, role: 'initiator' | 'target'): 'allocated' | 'registered' | 'vram' {
  if (memory === 'vram-dram') return role === 'initiator' ? 'vram' : 'allocated';
  return memory;
}

/** Wall clock in µs, comparable between processes on one host. */
export const wallUs = (): number => (performance.timeOrigin + performance.now()) * 1e3;

/**
 * Seeded permutation: which slots a batch uses, so blocks are scattered and never coalesce by
 * accident. With fewer slots than blocks they repeat (one slot: every block is the same "hot" one).
 */
export function scatter(slots: number, count: number, seed: number): number[] {
  const a = Array.from({ length: slots }, (_, i) => i);
  let x = seed >>> 0;
  for (let i = slots - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const j = x % (i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return Array.from({ length: count }, (_, i) => a[i % slots]);
}

export interface NodeInit {
  name: string;
  transports: string;
  memory: MemoryKind;
  regionBytes: number;
  progress: 'event' | 'poll';
  cma?: boolean;
  progressThread?: boolean;
  hugePages?: boolean;
  /** Start the socket-baseline server on this host (port chosen by the OS). */
  socketHost?: string;
}

export interface BatchSample {
  prepUs: number;
  postUs: number;
  transferUs: number;
}

export interface RunRequest {
  op: Op;
  block: number;
  batch: number;
  /** Slots per target area; blocks are drawn from them (2 × batch: spread; 1: hot). */
  slots: number;
  /** Indexes of loaded peers to address; with several, one batch goes to each per iteration. */
  peers: number[];
  /** Area of the target region this initiator uses (many-to-one: one per initiator). */
  remoteArea: number;
  runs: number;
  runMs: number;
  /** Wall-clock µs at which to start (initiators of one cell start together). */
  startAtUs: number;
  /** The path timed batches ask for (warm-up batches take 'auto': a cma grant arrives after the handshake). */
  path?: 'auto' | TransferPath;
  /**
   * Batches kept in flight (default 1): each of `depth` loops posts its next batch when its last
   * settled. They move the same blocks (a READ's batches land in the same local blocks: fine for a
   * throughput run, which checks no bytes).
   */
  depth?: number;
}

export interface RunResult {
  path: string;
  /** Per run: bytes moved and the wall-clock window. */
  runs: { bytes: number; startUs: number; endUs: number }[];
  samples: BatchSample[];
}

let agent: Agent | undefined;
let region: Region | undefined;
const peers: RemoteRegion[] = [];
let socketServer: net.Server | undefined;

function makeRegion(a: Agent, memory: MemoryKind, bytes: number, hugePages: boolean): Region {
  if (memory === 'allocated') return a.allocate(bytes, { name: 'kv' });
  if (memory === 'vram' || memory === 'vram-dram') {
    const region = a.allocate(bytes, { name: 'kv', memory: 'vram' });
    const chunk = Buffer.alloc(Math.min(bytes, 64 << 20));
    for (let i = 0; i < chunk.length; i += 4096) chunk[i] = (i >> 12) & 0xff;
    for (let at = 0; at < bytes; at += chunk.length) region.write(at, chunk.subarray(0, Math.min(chunk.length, bytes - at)));
    return region;
  }
  if (hugePages) {
    // A pool as such a user builds it: allocated, registered with the advice, then filled.
    const region = a.register(Buffer.alloc(bytes), { name: 'kv', hugePages: true });
    for (let i = 0; i < bytes; i += 4096) region.bytes[i] = i & 0xff;
    return region;
  }
  const buf = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4096) buf[i] = i & 0xff; // fault the pages in
  return a.register(buf, { name: 'kv' });
}

export async function init(m: NodeInit): Promise<{ metadata: string; socketPort?: number }> {
  agent = await Agent.create({ name: m.name, progress: m.progress, ucx: { transports: m.transports }, cma: m.cma ?? true, progressThread: m.progressThread });
  region = makeRegion(agent, m.memory, m.regionBytes, m.hugePages ?? false);
  let socketPort: number | undefined;
  if (m.socketHost && region.kind === 'dram') {
    socketServer = serveSocket(region.bytes);
    await new Promise<void>((resolve) => socketServer!.listen(0, m.socketHost, resolve));
    socketPort = (socketServer.address() as net.AddressInfo).port;
  }
  return { metadata: Buffer.from(agent.metadata()).toString('base64'), socketPort };
}

function loadPeers(metadata: string[]): { lengths: number[] } {
  for (const m of metadata) peers.push(agent!.loadPeer(Buffer.from(m, 'base64')).region('kv'));
  return { lengths: peers.map((p) => p.length) };
}

const sleepUntil = (us: number) => new Promise((r) => setTimeout(r, Math.max(0, (us - wallUs()) / 1e3)));

async function run(m: RunRequest): Promise<RunResult> {
  const a = agent!;
  const local = region!;
  const areaBytes = m.slots * m.block;
  // Each remote peer gets its own local area (a READ's destinations must not overlap).
  const plans = m.peers.map((p, k) => {
    const remote = peers[p];
    const need = (m.remoteArea + 1) * areaBytes;
    if (remote.length < need) throw new Error(`target region is ${remote.length} B; this cell needs ${need} B (block ${m.block} x ${m.slots} slots)`);
    if (local.length < (k + 1) * areaBytes) throw new Error(`local region is ${local.length} B; this cell needs ${(k + 1) * areaBytes} B`);
    return {
      remote,
      localOffsets: Float64Array.from(scatter(m.slots, m.batch, 1 + k), (s) => k * areaBytes + s * m.block),
      remoteOffsets: Float64Array.from(scatter(m.slots, m.batch, 2 + m.remoteArea), (s) => m.remoteArea * areaBytes + s * m.block),
    };
  });
  const samples: BatchSample[] = [];
  const paths = new Set<string>(); // every path the timed batches went by
  const iteration = async (record: boolean) => {
    const t0 = performance.now();
    const lists = plans.map((p) => [local.descriptors(p.localOffsets, m.block), p.remote.descriptors(p.remoteOffsets, m.block)] as const);
    const prepUs = ((performance.now() - t0) * 1e3) / plans.length;
    const o = { path: record ? m.path ?? 'auto' : 'auto' };
    const stats = await Promise.all(lists.map(([l, r]) => (m.op === 'write' ? a.write(l, r, o) : a.read(l, r, o))));
    if (record) for (const s of stats) paths.add(s.path);
    if (record) for (const s of stats) samples.push({ prepUs, postUs: s.postUs, transferUs: s.transferUs });
    return stats.reduce((n, s) => n + s.bytes, 0);
  };
  for (let i = 0; i < 2; i++) await iteration(false); // warm-up: connection, registration caches
  await sleepUntil(m.startAtUs);
  const runs: RunResult['runs'] = [];
  for (let r = 0; r < m.runs; r++) {
    const startUs = wallUs();
    let bytes = 0;
    let n = 0;
    const loop = async () => {
      while (n < 3 || wallUs() - startUs < m.runMs * 1e3) {
        n++;
        const moved = await iteration(true); // not `bytes += await …`: that reads `bytes` before the await
        bytes += moved;
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, m.depth ?? 1) }, loop));
    runs.push({ bytes, startUs, endUs: wallUs() });
  }
  return { path: [...paths].join('/'), runs, samples };
}

// ---- socket baseline: what a Node user would write without kvwire ----------------------------
// Header: op (1 = write, 2 = read), block, batch, slots (u32 LE each). WRITE: the client streams the
// batch's blocks and the server copies each into its slot, then answers one byte. READ: the server
// streams the blocks from its slots and the client copies them into its own.
const HEADER = 16;

/** Copies a byte stream into `batch` blocks at scattered slots of `into`; resolves when all landed. */
class BlockSink {
  #landed = 0;
  constructor(
    private readonly into: Uint8Array,
    private readonly offsets: number[],
    private readonly block: number,
  ) {}
  get total(): number {
    return this.offsets.length * this.block;
  }
  /** Takes what it needs from `chunk`; returns the rest (bytes past this batch). */
  push(chunk: Buffer): Buffer {
    let at = 0;
    while (at < chunk.length && this.#landed < this.total) {
      const k = Math.floor(this.#landed / this.block);
      const within = this.#landed % this.block;
      const n = Math.min(this.block - within, chunk.length - at);
      this.into.set(chunk.subarray(at, at + n), this.offsets[k] + within);
      at += n;
      this.#landed += n;
    }
    return chunk.subarray(at);
  }
  get done(): boolean {
    return this.#landed === this.total;
  }
}

function sendBlocks(sock: net.Socket, from: Uint8Array, offsets: number[], block: number): void {
  sock.cork();
  for (const o of offsets) sock.write(from.subarray(o, o + block));
  sock.uncork();
}

function serveSocket(bytes: Uint8Array): net.Server {
  return net.createServer((sock) => {
    sock.setNoDelay(true);
    let pending = Buffer.alloc(0);
    let sink: BlockSink | undefined;
    sock.on('data', (chunk: Buffer) => {
      let data = pending.length ? Buffer.concat([pending, chunk]) : chunk;
      pending = Buffer.alloc(0);
      while (data.length) {
        if (sink) {
          data = sink.push(data);
          if (sink.done) {
            sink = undefined;
            sock.write(Buffer.from([1]));
          }
          continue;
        }
        if (data.length < HEADER) {
          pending = Buffer.from(data);
          return;
        }
        const op = data.readUInt32LE(0);
        const block = data.readUInt32LE(4);
        const batch = data.readUInt32LE(8);
        const slots = data.readUInt32LE(12);
        data = data.subarray(HEADER);
        const offsets = scatter(slots, batch, 2).map((s) => s * block);
        if (op === 1) sink = new BlockSink(bytes, offsets, block);
        else sendBlocks(sock, bytes, offsets, block);
      }
    });
    sock.on('error', () => sock.destroy());
  });
}

async function socketRun(m: { host: string; port: number; op: Op; block: number; batch: number; slots: number; runs: number; runMs: number }): Promise<{ gbps: number[] }> {
  const bytes = region!.bytes;
  const offsets = scatter(m.slots, m.batch, 1).map((s) => s * m.block);
  const sock = net.connect(m.port, m.host);
  sock.setNoDelay(true);
  await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
  let onData: (chunk: Buffer) => void = () => {};
  sock.on('data', (c: Buffer) => onData(c));
  const header = Buffer.alloc(HEADER);
  header.writeUInt32LE(m.op === 'write' ? 1 : 2, 0);
  header.writeUInt32LE(m.block, 4);
  header.writeUInt32LE(m.batch, 8);
  header.writeUInt32LE(m.slots, 12);
  const batch = () =>
    new Promise<void>((resolve) => {
      if (m.op === 'write') {
        onData = () => resolve(); // the one-byte acknowledgement
        sock.write(header);
        sendBlocks(sock, bytes, offsets, m.block);
      } else {
        const sink = new BlockSink(bytes, offsets, m.block);
        onData = (c) => {
          sink.push(c);
          if (sink.done) resolve();
        };
        sock.write(header);
      }
    });
  for (let i = 0; i < 2; i++) await batch();
  const gbps: number[] = [];
  for (let r = 0; r < m.runs; r++) {
    const t0 = wallUs();
    let n = 0;
    while (n < 3 || wallUs() - t0 < m.runMs * 1e3) {
      await batch();
      n++;
    }
    gbps.push((n * m.batch * m.block) / (wallUs() - t0) / 1e3);
  }
  sock.destroy();
  return { gbps };
}

/** Single-thread memcpy of the same scattered blocks between two buffers of this process. */
function memcpyRun(m: { block: number; batch: number; slots: number; runs: number; runMs: number }): { gbps: number[] } {
  const src = Buffer.alloc(m.block * m.slots, 1);
  const dst = Buffer.alloc(m.block * m.slots, 2);
  const from = scatter(m.slots, m.batch, 1).map((s) => s * m.block);
  const to = scatter(m.slots, m.batch, 2).map((s) => s * m.block);
  const gbps: number[] = [];
  for (let r = 0; r < m.runs; r++) {
    const t0 = wallUs();
    let n = 0;
    while (n < 3 || wallUs() - t0 < m.runMs * 1e3) {
      for (let k = 0; k < m.batch; k++) src.copy(dst, to[k], from[k], from[k] + m.block);
      n++;
    }
    gbps.push((n * m.batch * m.block) / (wallUs() - t0) / 1e3);
  }
  return { gbps };
}

// ---- latency: 4 KiB WRITE + notification, ping-pong between two agents' JS -------------------
async function pingPong(m: { size: number; samples: number; serve: boolean }): Promise<{ oneWayUs: number[] }> {
  const a = agent!;
  const peer = peers[0];
  const l = region!.descriptors([0], [m.size]);
  const r = peer.descriptors([0], [m.size]);
  if (m.serve) {
    // Answer every ping with a pong of the same shape.
    a.on('notification', () => void a.write(l, r, { notify: 'pong' }).catch(() => {}));
    return { oneWayUs: [] };
  }
  const oneWayUs: number[] = [];
  for (let i = 0; i < m.samples + 20; i++) {
    const t0 = performance.now();
    await new Promise<void>((resolve, reject) => {
      a.once('notification', () => resolve());
      a.write(l, r, { notify: 'ping' }).catch(reject);
    });
    if (i >= 20) oneWayUs.push(((performance.now() - t0) * 1e3) / 2);
  }
  return { oneWayUs };
}

/** CPU used by this process over `seconds` of idling with its peers connected, % of one core. */
async function idleCpu(m: { seconds: number }): Promise<{ percent: number }> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, m.seconds * 1e3));
  const c = process.cpuUsage(c0);
  return { percent: ((c.user + c.system) / 1e3 / (performance.now() - t0)) * 100 };
}

/** UCX's description of this agent's open connections, parsed (the raw text stays here). */
function connections(): { connections: { peer: string; direction: string; protocols: EndpointProtocols }[] } {
  return { connections: agent!.connections().map((c) => ({ peer: c.peer, direction: c.direction, protocols: c.protocols })) };
}

const handlers: Record<string, (m: any) => unknown> = {
  init,
  connections,
  peers: (m) => loadPeers(m.metadata),
  run,
  socket: socketRun,
  memcpy: memcpyRun,
  pingPong,
  idleCpu,
};

/** Started by fork(): answer { id, cmd, ... } with { id, ok, ...result } until { cmd: 'exit' }. */
export function serveIpc(): void {
  // The orchestrator went away (killed, Ctrl-C): do not linger holding a UCX worker and a region.
  process.on('disconnect', () => process.exit(0));
  process.on('message', async (m: any) => {
    if (m.cmd === 'exit') {
      socketServer?.close();
      await agent?.close();
      process.exit(0);
    }
    try {
      process.send!({ id: m.id, ok: true, ...((await handlers[m.cmd](m)) as object) });
    } catch (e) {
      process.send!({ id: m.id, ok: false, error: e instanceof Error ? `${(e as any).code ?? 'Error'}: ${e.message}` : String(e) });
    }
  });
}

if (require.main === module) serveIpc();
