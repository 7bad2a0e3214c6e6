import { execFile, fork, type ChildProcess } from 'node:child_process';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { expect } from 'vitest';
import { Agent, KvwireError, ucxVersion } from '../lib';

export interface PeerReply {
  ok: boolean;
  error?: { code: string; message: string; index?: number };
  [key: string]: any;
}

/** A kvwire agent running in a child process, driven over IPC. */
export class PeerProcess {
  readonly child: ChildProcess;
  readonly notifications: any[] = [];
  #next = 1;
  #pending = new Map<number, (r: PeerReply) => void>();
  #events: ((m: any) => void)[] = [];
  metadata = '';

  constructor(readonly name: string, env: NodeJS.ProcessEnv = {}, script = 'fixtures/peer.cjs') {
    this.child = fork(path.join(__dirname, script), [], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    this.child.on('message', (m: any) => {
      if (m.event) {
        if (m.event === 'notification') this.notifications.push(m);
        for (const fn of this.#events) fn(m);
        return;
      }
      const done = this.#pending.get(m.id);
      this.#pending.delete(m.id);
      done?.(m);
    });
    this.child.on('exit', (code, signal) => {
      if (code !== 0 && signal !== 'SIGKILL') console.error(`peer ${name} exited early: code ${code}, signal ${signal}`);
      for (const done of this.#pending.values()) done({ ok: false, error: { code: 'EXITED', message: 'peer exited' } });
      this.#pending.clear();
    });
  }

  call(cmd: string, args: Record<string, unknown> = {}): Promise<PeerReply> {
    const id = this.#next++;
    return new Promise((resolve) => {
      if (!this.child.connected) {
        resolve({ ok: false, error: { code: 'EXITED', message: `peer ${this.name} is not running` } });
        return;
      }
      this.#pending.set(id, resolve);
      this.child.send({ id, cmd, ...args }, (err) => {
        if (!err) return;
        this.#pending.delete(id);
        resolve({ ok: false, error: { code: 'EXITED', message: `peer ${this.name}: ${err.message}` } });
      });
    });
  }

  async ok(cmd: string, args: Record<string, unknown> = {}): Promise<PeerReply> {
    const r = await this.call(cmd, args);
    if (!r.ok) throw new Error(`${this.name}.${cmd} failed: ${JSON.stringify(r.error)}`);
    return r;
  }

  waitEvent(event: string, timeoutMs = 10_000, match: (m: any) => boolean = () => true): Promise<any> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no '${event}' event from ${this.name} in ${timeoutMs} ms`)), timeoutMs);
      const fn = (m: any) => {
        if (m.event !== event || !match(m)) return;
        clearTimeout(timer);
        this.#events.splice(this.#events.indexOf(fn), 1);
        resolve(m);
      };
      this.#events.push(fn);
    });
  }

  async init(opts: { transports?: string; memory: 'allocated' | 'registered' | 'vram'; size: number; access?: string; progress?: string; cma?: boolean; progressThread?: boolean; device?: number }) {
    const r = await this.ok('init', { name: this.name, ...opts });
    this.metadata = r.metadata;
    return r;
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }

  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    await this.call('close');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

/**
 * SIGSTOPs a process and returns once every one of its threads has stopped. A group stop is not
 * instant: the thread the signal picked must run to stop the others, and meanwhile another thread
 * (kvwire's progress thread) can still answer a peer, as seen on a loaded 2-core machine.
 */
export function stopProcess(pid: number): void {
  process.kill(pid, 'SIGSTOP');
  const until = Date.now() + 5000;
  const stopped = () =>
    readdirSync(`/proc/${pid}/task`).every((tid) => {
      try {
        return /^[Tt]$/.test(readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8').replace(/^.*\) /s, '')[0]);
      } catch {
        return true; // the thread is gone
      }
    });
  while (!stopped()) if (Date.now() > until) throw new Error(`process ${pid} did not stop within 5 s`);
}

/** Connects two peer processes to each other. */
export async function connect(a: PeerProcess, b: PeerProcess): Promise<void> {
  await a.ok('load', { metadata: b.metadata });
  await b.ok('load', { metadata: a.metadata });
}

/** Deterministic pseudo-random integers. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** `count` lengths, log-uniform in [minLen, maxLen], so small and large blocks both appear. */
export function mixedLengths(seed: number, count: number, minLen: number, maxLen: number): number[] {
  const next = rng(seed);
  const lo = Math.log2(minLen);
  const hi = Math.log2(maxLen);
  return Array.from({ length: count }, () => {
    const len = Math.round(2 ** (lo + ((next() % 10_000) / 9_999) * (hi - lo)));
    return Math.max(minLen, Math.min(maxLen, len));
  });
}

/**
 * Places ranges of `lengths` inside `size` bytes in a shuffled order with random gaps, so the
 * layout differs per seed and neighbours are rarely adjacent. Returns each range's offset.
 */
export function place(seed: number, lengths: number[], size: number): number[] {
  const next = rng(seed);
  const total = lengths.reduce((a, b) => a + b, 0);
  if (total > size) throw new Error(`ranges need ${total} bytes, region has ${size}`);
  const order = lengths.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = next() % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const gap = (size - total) / lengths.length;
  const offsets = new Array<number>(lengths.length);
  let cursor = 0;
  for (const i of order) {
    cursor += Math.floor(gap * ((next() % 1000) / 1000));
    offsets[i] = cursor;
    cursor += lengths[i];
  }
  return offsets;
}

/** FNV-1a (64-bit) of `bytes`: the checksum that trails a metadata blob (native/core/metadata.cc). */
export function metadataChecksum(bytes: Uint8Array): bigint {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return h;
}

/**
 * Rewrites the trailing checksum of an (altered) unsigned metadata blob, as a careless encoder or
 * an attacker who knows the format would: the decoder's own checks must then catch what is wrong.
 */
export function reseal(blob: Buffer): Buffer {
  if (blob.length >= 8) blob.writeBigUInt64LE(metadataChecksum(blob.subarray(0, blob.length - 8)), blob.length - 8);
  return blob;
}

// The regions of a plain blob, split into their fixed part (id..length), key and sections, and
// re-encoded after `edit` (as `version`), with body length and checksum fixed: a careful forger.
export interface RawRegion { fixed: Buffer; key: Buffer; sections: Buffer }
export function reencodeMetadata(blob: Buffer, edit: (regions: RawRegion[]) => void, version = 3): Buffer {
  let q = 12;
  q += 1 + blob[q] + 16; // name, agent id, generation
  q += 1 + blob[q]; // backend
  q += 4 + blob.readUInt32LE(q); // worker address
  const regionCount = q;
  const firstRegion = q + 4;
  const regions: RawRegion[] = [];
  let p = firstRegion;
  for (let i = 0; i < blob.readUInt32LE(regionCount); i++) {
    const start = p;
    p += 4;
    p += 1 + blob[p] + 3 + 4 + 8 + 8;
    const fixed = blob.subarray(start, p);
    const key = blob.subarray(p + 4, p + 4 + blob.readUInt32LE(p));
    p += 4 + key.length;
    const sectionsStart = p;
    const n = blob[p++];
    for (let k = 0; k < n; k++) {
      p += 1 + blob[p];
      p += 4 + blob.readUInt32LE(p);
    }
    regions.push({ fixed, key, sections: blob.subarray(sectionsStart, p) });
  }
  edit(regions);
  const parts = [blob.subarray(0, firstRegion)];
  for (const r of regions) {
    const len = Buffer.alloc(4);
    len.writeUInt32LE(r.key.length);
    parts.push(r.fixed, len, r.key, version === 3 ? r.sections : Buffer.alloc(0));
  }
  parts.push(Buffer.alloc(8));
  const out = Buffer.concat(parts);
  out.writeUInt16LE(version, 4);
  out.writeUInt32LE(out.length - 12 - 8, 8);
  return reseal(out);
}

/** The KvwireError `fn` throws (the test fails if it throws nothing, or something else). */
export function thrown(fn: () => unknown): KvwireError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(KvwireError);
    return e as KvwireError;
  }
  throw new Error('expected a throw');
}

// The sealed-metadata format of an agent with a secret (lib/agent.ts): 'KVWS' | 12-byte IV |
// AES-256-GCM ciphertext | 16-byte tag, key HKDF-SHA256(secret, no salt, 'kvwire metadata v1'), the
// magic as additional data. Written out here from the README so the tests check the format too.
function metadataKey(secret: string): Buffer {
  return Buffer.from(hkdfSync('sha256', secret, Buffer.alloc(0), 'kvwire metadata v1', 32));
}
export function sealMetadata(plain: Uint8Array, secret: string): Buffer {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', metadataKey(secret), iv).setAAD(Buffer.from('KVWS'));
  const body = Buffer.concat([cipher.update(plain), cipher.final()]);
  return Buffer.concat([Buffer.from('KVWS'), iv, body, cipher.getAuthTag()]);
}
export function openMetadata(sealed: Uint8Array, secret: string): Buffer {
  const b = Buffer.from(sealed);
  if (!b.subarray(0, 4).equals(Buffer.from('KVWS'))) throw new Error('not sealed metadata');
  const decipher = createDecipheriv('aes-256-gcm', metadataKey(secret), b.subarray(4, 16)).setAAD(Buffer.from('KVWS'));
  decipher.setAuthTag(b.subarray(b.length - 16));
  return Buffer.concat([decipher.update(b.subarray(16, b.length - 16)), decipher.final()]);
}

// The hostile-peer tool (test/hostile/hostile_peer.cc), built next to the addon this run loads
// (npm run build:native; the UCX 1.22 smoke and the sanitizer lane build their own).
const addonDir = path.dirname(process.env.KVWIRE_ADDON ? path.resolve(process.env.KVWIRE_ADDON) : path.join(__dirname, '..', 'build', 'Release', 'kvwire.node'));
export const HOSTILE_TOOL = path.join(addonDir, 'kvwire_hostile_peer');
// The CUDA driver test double (test/cuda-double), built next to the addon: KVWIRE_CUDA_DRIVER=<this>.
export const CUDA_DOUBLE = path.join(addonDir, 'libkvwire-cuda-double.so');
const [ucxMajor, ucxMinor] = ucxVersion().split('.').map(Number);
// UCX 1.13 itself crashes on an active message id >= 32768, before any handler of kvwire's runs (a
// UCX bug, measured with this tool; UCX 1.22 drops them): there, those ids are left out.
export const UCX_113 = ucxMajor === 1 && ucxMinor < 22;

/** Starts the tool against the agent whose (plain) metadata this is: `<scenario> [args]`. */
export function startHostileTool(transports: string, metadata: Uint8Array, args: string[], timeoutMs?: number): ChildProcess {
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'kvwire-hostile-')), 'md.bin');
  writeFileSync(file, metadata);
  return execFile(HOSTILE_TOOL, [file, ...args], {
    // Shared memory with peer error handling needs UCX_MM_ERROR_HANDLING (kvwire sets it for itself).
    env: { ...process.env, ...(UCX_113 ? { HOSTILE_MAX_ID: '32767' } : {}), UCX_TLS: transports, UCX_MM_ERROR_HANDLING: 'y', UCX_WARN_UNUSED_ENV_VARS: 'n' },
    timeout: timeoutMs,
  });
}

/** Runs the tool to its end; resolves with how many messages it sent (rejects if it failed). */
export async function runHostileTool(transports: string, metadata: Uint8Array, ...args: string[]): Promise<number> {
  const child = startHostileTool(transports, metadata, args, 120_000);
  let stdout = '';
  child.stdout!.on('data', (d) => (stdout += d));
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0) throw new Error(`${HOSTILE_TOOL} ${args.join(' ')} exited with ${code}: ${stderr.trim()}`);
  return Number(/sent (\d+) messages/.exec(stdout)?.[1] ?? 0);
}

/**
 * A legitimate agent (named `name`, holding `secret` if given) loads the target's metadata (base64) and
 * is served both ways: a 4 KiB WRITE of `fill` bytes into the target's region 'kv' (with `notify`, if
 * given), read back and checked. What a test asserts after an attack on the target. Returns the agent
 * (the caller closes it).
 */
export async function expectServedBothWays(
  transports: string,
  metadata: string,
  options: { name?: string; secret?: string; fill: number; notify?: string },
): Promise<Agent> {
  const legit = await Agent.create({ name: options.name ?? 'legit', secret: options.secret, ucx: { transports } });
  try {
    const peer = legit.loadPeer(Buffer.from(metadata, 'base64'));
    const mine = legit.register(Buffer.alloc(8192).fill(options.fill, 0, 4096), { name: 'mine' });
    await legit.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), options.notify === undefined ? {} : { notify: options.notify });
    await legit.read(mine.descriptors([4096], [4096]), peer.region('kv').descriptors([0], [4096]));
    expect(mine.bytes.subarray(4096).every((x) => x === options.fill)).toBe(true);
    return legit;
  } catch (e) {
    await legit.close();
    throw e;
  }
}
