// GPU memory (VRAM) regions and path 'cuda_ipc'. CI has no GPU: these run against the CUDA driver
// test double (test/cuda-double: libcuda's entry points over host memory, device pointers that fault
// when the host touches them, IPC handles that really open across processes), selected with
// KVWIRE_CUDA_DRIVER. `npm run test:gpu` (KVWIRE_GPU=1) runs the same suite against the real driver;
// the tests that need the double's pacing or fault injection are skipped there, and say so.
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvLayout, KvReceiver, KvSender, KvwireError, POOL_REGION, type Peer, type Region } from '../lib';
import { CUDA_DOUBLE, PeerProcess, mixedLengths, place, reencodeMetadata, reseal, rng, runHostileTool, stopProcess, thrown, type RawRegion } from './helpers';

const CLI = path.join(__dirname, '..', 'dist', 'cli', 'index.js');
const MiB = 1 << 20;

// On a GPU (KVWIRE_GPU=1): the real driver. Otherwise this process's CUDA driver, and its peers', is
// the double (the driver is loaded on first use, after these lines).
const GPU = process.env.KVWIRE_GPU === '1';
if (!GPU) process.env.KVWIRE_CUDA_DRIVER = CUDA_DOUBLE;
const DOUBLE: NodeJS.ProcessEnv = GPU ? {} : { KVWIRE_CUDA_DRIVER: CUDA_DOUBLE };
// (KVWIRE_GPU=1 with KVWIRE_CUDA_DRIVER set runs the GPU variant against that library: a dry run of
// the GPU suite against the double, in which only the "real driver" check fails.)
/** Tests that need the double's pacing (copy delay) or fault injection. */
const doubleOnly = it.skipIf(GPU);
const DEVICES: number = GPU ? info({}).cuda.devices.length : 2;
const DEV1 = Math.min(1, DEVICES - 1); // a second device where there is one

/** `kvwire info --json` with `env` added to this process's environment. */
function info(env: NodeJS.ProcessEnv): any {
  return infoIn({ ...process.env, ...env });
}

/** `kvwire info --json` in exactly `env` (e.g. without the KVWIRE_CUDA_DRIVER this file sets). */
function infoIn(env: NodeJS.ProcessEnv): any {
  return JSON.parse(execFileSync(process.execPath, [CLI, 'info', '--json'], { env, encoding: 'utf8' }));
}

function random(seed: number, size: number): Buffer {
  const next = rng(seed);
  const b = Buffer.alloc(size);
  for (let i = 0; i + 4 <= size; i += 4) b.writeUInt32LE(next(), i); // rng gives 32-bit integers
  return b;
}

function hashOf(region: Region, offsets: number[], lengths: number[]): string {
  const h = createHash('sha256');
  for (let i = 0; i < offsets.length; i++)
    h.update(region.kind === 'vram' ? region.read(offsets[i], lengths[i]) : region.bytes.subarray(offsets[i], offsets[i] + lengths[i]));
  return h.digest('hex');
}

// Offset of the first region's length field in a plain metadata blob (native/core/metadata.cc).
function firstRegionLengthOffset(blob: Buffer): number {
  let p = 12;
  p += 1 + blob[p]; // name
  p += 16; // agent id, generation
  p += 1 + blob[p]; // backend
  p += 4 + blob.readUInt32LE(p); // worker address
  p += 4; // region count
  p += 4; // id
  p += 1 + blob[p]; // name
  p += 3 + 4 + 8; // kind, access, flags, device, base
  return p;
}

describe('without a CUDA driver', () => {
  it('every VRAM entry point answers ERR_UNAVAILABLE with the reason, and kvwire info says so', () => {
    const env = { KVWIRE_CUDA_DRIVER: '/nonexistent/libcuda.so.1' };
    const script = `
      const { Agent } = require(${JSON.stringify(path.join(__dirname, '..', 'dist'))});
      (async () => {
        const a = await Agent.create({ name: 'no-gpu' });
        const out = [];
        for (const f of [() => a.allocate(4096, { name: 'v', memory: 'vram' }),
                         () => a.register({ device: 0, address: 0x10000n, bytes: 4096 }, { name: 'r' })]) {
          try { f(); out.push('no error'); } catch (e) { out.push(e.code + ': ' + e.message); }
        }
        const host = a.allocate(4096, { name: 'h' });  // host memory is unaffected
        out.push(host.kind);
        await a.close();
        console.log(JSON.stringify(out));
      })();`;
    const out = JSON.parse(execFileSync(process.execPath, ['-e', script], { env: { ...process.env, ...env }, encoding: 'utf8' }));
    expect(out[0]).toMatch(/^ERR_UNAVAILABLE: CUDA driver \/nonexistent\/libcuda\.so\.1 \(KVWIRE_CUDA_DRIVER\) could not be loaded/);
    expect(out[1]).toMatch(/^ERR_UNAVAILABLE: CUDA driver \/nonexistent/);
    expect(out[2]).toBe('dram');
    const i = info(env);
    expect(i.cuda.available).toBe(false);
    expect(i.cuda.reason).toMatch(/\/nonexistent\/libcuda\.so\.1/);
    expect(i.cuda.devices).toEqual([]);
    for (const p of i.paths.filter((x: any) => x.path.startsWith('cuda_ipc'))) {
      expect(p.ready).toBe(false);
      expect(p.detail).toMatch(/could not be loaded/);
    }
  });

  it('kvwire info on the default driver tells the truth: a real driver with devices, or why there is none', () => {
    const { KVWIRE_CUDA_DRIVER: _, ...env } = process.env;
    const i = infoIn(env);
    expect(i.cuda.testDouble).toBeUndefined();
    if (i.cuda.available) expect(i.cuda.devices.length).toBeGreaterThan(0);
    else expect(i.cuda.reason).toMatch(/libcuda\.so\.1 not found|no CUDA device|failed to initialise/);
    expect(i.ucx.version).toMatch(/^\d+\.\d+\.\d+$/);
    expect(i.ucx.transports.length).toBeGreaterThan(0);
    expect(i.ucx.memoryTypes).toContain('host');
    const gdr = i.paths.find((x: any) => x.path.startsWith('GPUDirect'));
    const rdma = i.ucx.transports.some((t: string) => /^(rc|dc|ud)_(verbs|mlx5)\//.test(t));
    const peermem = existsSync('/sys/module/nvidia_peermem') || existsSync('/sys/module/nv_peer_mem');
    expect(gdr.ready).toBe(i.cuda.available && i.ucx.memoryTypes.includes('cuda') && rdma && peermem);
    if (!i.cuda.available) expect(i.paths.find((x: any) => x.path === 'am (VRAM, any host)').ready).toBe(false);
  });

  it('npm run test:gpu: no driver or no device is a skip (exit 77, not a pass); a driver that is there but unusable is a failure', () => {
    const out = mkdtempSync(path.join(tmpdir(), 'kvwire-gpu-'));
    const run = (env: NodeJS.ProcessEnv) =>
      spawnSync('bash', [path.join(__dirname, 'gpu', 'run.sh')], { env: { ...env, KVWIRE_GPU_OUT: out }, encoding: 'utf8' });
    const { KVWIRE_CUDA_DRIVER: _, ...plain } = process.env;
    const broken = run({ ...plain, KVWIRE_GPU_DRY_RUN: '1', KVWIRE_CUDA_DRIVER: '/nonexistent/libcuda.so.1' });
    expect(broken.status).toBe(1);
    expect(broken.stderr).toMatch(/FAILED: the CUDA driver is present but unusable: CUDA driver \/nonexistent\/libcuda\.so\.1 \(KVWIRE_CUDA_DRIVER\) could not be loaded/);
    expect(broken.stdout).not.toMatch(/skipped/);
    // Where this machine has no driver at all (CI): the skip. (With a driver, that would run the GPU suite.)
    const here = infoIn(plain);
    if (/libcuda\.so\.1 not found/.test(here.cuda.reason ?? '')) {
      const none = run(plain);
      expect(none.status, none.stderr).toBe(77);
      expect(none.stdout).toMatch(/^skipped: no CUDA device \(no CUDA driver: libcuda\.so\.1 not found/m);
    }
  });
});

describe(`VRAM regions (${GPU ? 'real CUDA driver' : 'CUDA test double'}, one process)`, () => {
  let agent: Agent;
  beforeAll(async () => {
    agent = await Agent.create({ name: 'vram-local' });
  });
  afterAll(async () => {
    await agent.close();
  });

  it('kvwire info names the driver (the double as a double), its devices, and the cuda_ipc paths ready', () => {
    const i = info(DOUBLE);
    expect(i.cuda.available).toBe(true);
    if (GPU) expect(i.cuda.testDouble).toBeUndefined();
    else expect(i.cuda.testDouble).toMatch(/test double/);
    expect(i.cuda.devices.map((d: any) => d.ordinal)).toEqual([...Array(DEVICES).keys()]);
    for (const p of i.paths.filter((x: any) => x.path.startsWith('cuda_ipc'))) {
      expect(p.ready).toBe(true);
      if (!GPU) expect(p.detail).toMatch(/TEST DOUBLE/);
    }
    // VRAM by active messages: through UCX where it has CUDA memory support, else staged by kvwire
    // (always here: UCX never sees the double).
    const am = i.paths.find((x: any) => x.path === 'am (VRAM, any host)');
    expect(am.ready).toBe(true);
    expect(am.detail).toMatch(i.ucx.memoryTypes.includes('cuda') ? /handed to UCX with its memory type/ : /staged by kvwire through host memory .*has no CUDA memory type/);
    const forced = info({ ...DOUBLE, KVWIRE_VRAM_STAGING: '1' }).paths.find((x: any) => x.path === 'am (VRAM, any host)');
    expect(forced.detail).toMatch(/staged by kvwire through host memory on each side \(KVWIRE_VRAM_STAGING is set\)/);
  });

  it('kvwire info is truthful about settings that break paths (a bad staging limit, self only, no shared memory) and flags paths that only the double makes ready', () => {
    const vramAm = (i: any) => i.paths.find((x: any) => x.path === 'am (VRAM, any host)');
    // Agents cannot even be created with a bad limit: nothing is ready, and it says why.
    const bad = info({ ...DOUBLE, KVWIRE_VRAM_STAGING_LIMIT: 'abc' });
    for (const p of bad.paths) {
      expect(p.ready, p.path).toBe(false);
      if (!p.path.startsWith('cma') && !p.path.startsWith('GPUDirect')) expect(p.detail, p.path).toMatch(/KVWIRE_VRAM_STAGING_LIMIT 'abc' .*Agent\.create refuses it/);
    }
    expect(vramAm(info({ ...DOUBLE, KVWIRE_VRAM_STAGING: '1', KVWIRE_VRAM_STAGING_LIMIT: String(4 * MiB) })).detail).toMatch(/at most 4 MiB staged per connection/);
    expect(vramAm(info({ ...DOUBLE, KVWIRE_VRAM_STAGING: '1' })).detail).toMatch(/at most 1 GiB staged per connection/);
    // 'self' reaches no other process.
    const self = info({ ...DOUBLE, UCX_TLS: 'self' });
    const hostAm = self.paths.find((x: any) => x.path === 'am (host, any host)');
    expect(hostAm.ready).toBe(false);
    expect(hostAm.detail).toMatch(/only 'self'/);
    expect(vramAm(self).ready).toBe(false);
    // Without shared memory a peer's host memory is not mapped here: cuda_ipc DRAM<->VRAM is this agent's own only.
    const tcp = info({ ...DOUBLE, UCX_TLS: 'tcp' }).paths.find((x: any) => x.path === 'cuda_ipc (DRAM<->VRAM, same host)');
    expect(tcp.detail).toMatch(/this agent's own host regions only/);
    const i = info(DOUBLE);
    for (const p of i.paths.filter((x: any) => x.path.startsWith('cuda_ipc') || x.path === 'am (VRAM, any host)'))
      expect(p.testDouble, p.path).toBe(GPU ? undefined : true);
    for (const p of i.paths.filter((x: any) => !x.path.startsWith('cuda_ipc') && !x.path.includes('VRAM'))) expect(p.testDouble, p.path).toBeUndefined();
  });

  it('KV workers with a VRAM pool: a sender refuses host staging for it; a VRAM receiver pulls run by run from a staging sender', async () => {
    const spec = { modelId: 'm', layers: 2, tokensPerBlock: 16, kvHeads: 8, headDim: 64, dtypeBytes: 2, blockLayout: 'NHD' } as const;
    const prefillLayout = new KvLayout({ ...spec, blocks: 8 });
    const decodeLayout = new KvLayout({ ...spec, blocks: 8, tp: { rank: 1, size: 2 } });
    const gpuPool = agent.allocate(prefillLayout.regionBytes, { name: 'vram-pool', memory: 'vram', device: 0 });
    const refused = thrown(() => new KvSender(agent, prefillLayout, gpuPool, { stagingBytes: MiB }));
    expect(refused.code).toBe('ERR_INVALID_PARAM');
    expect(refused.message).toMatch(/stagingBytes.*VRAM/);
    agent.deregister(gpuPool);
    const prefill = await Agent.create({ name: 'kv-prefill-dram' });
    const decode = await Agent.create({ name: 'kv-decode-vram' });
    try {
      const pool = prefill.allocate(prefillLayout.regionBytes, { name: POOL_REGION, access: 'read' });
      pool.bytes.set(random(91, pool.length));
      const sender = new KvSender(prefill, prefillLayout, pool, { stagingBytes: MiB });
      const intoVram = decode.allocate(decodeLayout.regionBytes, { name: 'dst-vram', memory: 'vram', device: 0 });
      const intoHost = decode.allocate(decodeLayout.regionBytes, { name: 'dst-host' });
      const source = decode.loadPeer(prefill.metadata());
      const rq = { sources: [source], sourceLayout: prefillLayout, sourceBlocks: [1, 4, 6], destinationBlocks: [0, 3, 7] };
      for (const id of ['r1', 'r2']) sender.publish(id, rq.sourceBlocks).then(() => {}, () => {});
      const viaVram = await new KvReceiver(decode, decodeLayout, intoVram).pull({ ...rq, requestId: 'r1' });
      const viaHost = await new KvReceiver(decode, decodeLayout, intoHost).pull({ ...rq, requestId: 'r2' });
      expect(viaVram.bytes).toBe(viaHost.bytes);
      expect(viaHost.transfers).toBe(1);
      expect(intoVram.read(0, intoVram.length).equals(Buffer.from(intoHost.bytes))).toBe(true);
      expect(intoHost.bytes.some((x) => x !== 0)).toBe(true);
      sender.close();
    } finally {
      await decode.close();
      await prefill.close();
    }
  });

  it('allocate(vram): zeroed (the double hands out dirty memory, as GPUs do), no host view, write/read copies, bounds and device checked', () => {
    const r = agent.allocate(MiB, { name: 'v0', memory: 'vram', device: DEV1 });
    expect(r.read(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
    expect(r.kind).toBe('vram');
    expect(r.device).toBe(DEV1);
    expect(r.address).toBeGreaterThan(0n);
    expect(thrown(() => r.bytes).code).toBe('ERR_NOT_ALLOWED');
    const data = random(1, 64 * 1024);
    r.write(4096, data);
    expect(r.read(4096, data.length).equals(data)).toBe(true);
    r.write(MiB - 3, Buffer.from([1, 2, 3]));
    expect([...r.read(MiB - 3, 3)]).toEqual([1, 2, 3]);
    const shared = new Uint8Array(new SharedArrayBuffer(16)).fill(9);
    r.write(0, shared.buffer);
    expect([...r.read(0, 16)]).toEqual([...shared]);
    expect(thrown(() => r.write(0, 'text' as any)).message).toMatch(/^data:/);
    expect(thrown(() => r.write(MiB - 2, Buffer.alloc(3))).message).toMatch(/outside region 'v0'/);
    expect(thrown(() => r.read(MiB, 1)).code).toBe('ERR_INVALID_PARAM');
    expect(thrown(() => r.read(-1, 1)).code).toBe('ERR_INVALID_PARAM');
    const e = thrown(() => agent.allocate(4096, { name: 'v9', memory: 'vram', device: 64 }));
    expect(e.code).toBe('ERR_INVALID_PARAM');
    expect(e.message).toMatch(new RegExp(`device 64 does not exist \\(this machine has ${DEVICES} CUDA devices?\\)`));
    expect(thrown(() => agent.allocate(4096, { name: 'x', memory: 'vram', device: -1 })).message).toMatch(/^device:/);
    expect(thrown(() => agent.allocate(4096, { name: 'x', memory: 'gpu' as any })).message).toMatch(/^memory:/);
    expect(thrown(() => agent.allocate(4096, { name: 'x', device: 1 })).message).toMatch(/^device: applies to memory: 'vram'/);
    expect(thrown(() => agent.register(Buffer.alloc(16), { name: 'x', device: 1 })).message).toMatch(/^device: does not apply to host memory/);
    expect(thrown(() => agent.register(Buffer.alloc(16), { name: 'x', memory: 'vram' })).message).toMatch(/^memory: does not apply/);
    agent.deregister(r);
    expect(thrown(() => r.read(0, 1)).code).toBe('ERR_NOT_FOUND');
  });

  it('register({ device, address, bytes }): memory another library owns, checked with the driver, never freed by kvwire', () => {
    const owner = agent.allocate(MiB, { name: 'owner', memory: 'vram' });
    const data = random(2, 8192);
    owner.write(8192, data);
    const borrowed = agent.register({ device: 0, address: owner.address + 8192n, bytes: 65536 }, { name: 'borrowed' });
    expect(borrowed.kind).toBe('vram');
    expect(borrowed.read(0, 8192).equals(data)).toBe(true);
    agent.deregister(borrowed);
    expect(owner.read(8192, 8192).equals(data)).toBe(true); // still allocated: kvwire did not free it
    const refused = (memory: any, pattern: RegExp) => {
      const e = thrown(() => agent.register(memory, { name: 'bad' }));
      expect(e.code).toBe('ERR_INVALID_PARAM');
      expect(e.message).toMatch(pattern);
    };
    refused({ device: 0, address: 0x10000n, bytes: 4096 }, /is not CUDA device memory/);
    if (DEVICES > 1) refused({ device: 1, address: owner.address, bytes: 4096 }, /is memory of CUDA device 0, not device 1/);
    // (kvwire allocates whole 2 MiB granules: the allocation behind a 1 MiB region is 2 MiB.)
    refused({ device: 0, address: owner.address + 4096n, bytes: 2 * MiB }, /runs past its allocation \(2093056 bytes left/);
    refused({ device: 0, address: 0n, bytes: 4096 }, /^address:/);
    refused({ device: 0, address: 4096, bytes: 4096 }, /^address:/);
    refused({ device: 0, address: 2n ** 64n - 1n, bytes: 4096 }, /^bytes: address \+ bytes runs past/);
    refused({ device: 0.5, address: owner.address, bytes: 4096 }, /^device:/);
    refused({ device: 0, address: owner.address, bytes: 0 }, /^bytes:/);
    agent.deregister(owner);
  });

  it('only a whole allocation of whole 2 MiB granules is exported to same-host peers (a CUDA IPC handle opens all of it)', async () => {
    const other = await Agent.create({ name: 'vram-viewer' });
    try {
      const owner = agent.allocate(MiB, { name: 'whole', memory: 'vram' });
      const part = agent.register({ device: 0, address: owner.address + 4096n, bytes: 4096 }, { name: 'part' });
      const head = agent.register({ device: 0, address: owner.address, bytes: MiB }, { name: 'head' }); // of a 2 MiB allocation
      const same = agent.register({ device: 0, address: owner.address, bytes: 2 * MiB }, { name: 'same' });
      expect([owner, part, head, same].map((r) => r.exported)).toEqual([true, false, false, true]);
      const peer = other.loadPeer(agent.metadata());
      expect(peer.region('part').exported).toBe(false);
      expect(peer.region('same').exported).toBe(true);
      const mine = other.allocate(8192, { name: 'mine', memory: 'vram' });
      const tryWrite = (name: string, path?: 'cuda_ipc') =>
        other.write(mine.descriptors([0], [4096]), peer.region(name).descriptors([0], [4096]), { path }).catch((x) => x);
      mine.write(0, random(8, 4096));
      for (const name of ['part', 'head']) {
        const e = await tryWrite(name, 'cuda_ipc');
        expect(e.code).toBe('ERR_UNAVAILABLE');
        expect(e.message).toMatch(/publishes no CUDA IPC handle: its owner exports only regions that are a whole CUDA allocation/);
        // Unexported VRAM is still reachable: 'auto' moves it by active messages, the owner copying
        // into its own VRAM.
        expect((await tryWrite(name)).path).toBe('am');
        expect((name === 'part' ? part : head).read(0, 4096).equals(mine.read(0, 4096))).toBe(true);
      }
      // The whole ones carry a handle: refused only later, because both agents are in this process
      // (the double refuses that as CUDA does; where a driver opens it, the write goes through).
      for (const name of ['whole', 'same']) {
        const r = await tryWrite(name, 'cuda_ipc');
        if (!(GPU && !(r instanceof Error))) expect(r.message).toMatch(/does not open here/);
      }
      // The allocating region deregistered first: 'same' still publishes that memory, so it stays.
      const data = random(9, 4096);
      same.write(0, data);
      agent.deregister(owner);
      // (Once the viewer acknowledged the revocation, nothing holds the owner's memory but 'same'.)
      for (let i = 0; i < 100 && agent.health.retiredRegions > 0; i++) await new Promise((res) => setTimeout(res, 20));
      expect(agent.health.retiredRegions).toBe(0);
      expect(same.read(0, 4096).equals(data)).toBe(true); // freed device memory is refused by the double
      for (const r of [part, head, same]) agent.deregister(r);
    } finally {
      await other.close();
    }
  });

  it("a target serves active messages into and out of its VRAM by its own table, not the metadata (forged to call it host memory, with a real key)", async () => {
    const other = await Agent.create({ name: 'vram-forger' });
    try {
      const v = agent.allocate(MiB, { name: 'victim', memory: 'vram' });
      const h = agent.register(Buffer.alloc(MiB), { name: 'host-key' });
      const forged = reencodeMetadata(Buffer.from(agent.metadata()), (regions) => {
        const names = regions.map((r) => r.fixed.subarray(5, 5 + r.fixed[4]).toString());
        const victim = regions[names.indexOf('victim')];
        const keyed = regions[names.indexOf('host-key')];
        const f = Buffer.from(victim.fixed);
        f[4 + 1 + f[4]] = 0; // kind: dram
        victim.fixed = f;
        victim.key = keyed.key;
        victim.sections = Buffer.from([0]);
      });
      const peer = other.loadPeer(forged);
      expect(peer.region('victim').kind).toBe('dram');
      // The initiator takes it for host memory; the target knows it is VRAM and copies with the
      // driver (host code touching a device address of the double faults: this would crash).
      const mine = other.register(random(12, 8192), { name: 'mine' });
      for (const [i, path] of (['am', 'auto'] as const).entries()) {
        const at = i * 4096;
        const w = await other.write(mine.descriptors([at], [4096]), peer.region('victim').descriptors([at], [4096]), { path });
        expect(w.path).toBe('am');
        expect(v.read(at, 4096).equals(mine.bytes.subarray(at, at + 4096))).toBe(true);
      }
      v.write(65536, random(13, 4096));
      const back = other.register(Buffer.alloc(4096), { name: 'back' });
      expect((await other.read(back.descriptors([0], [4096]), peer.region('victim').descriptors([65536], [4096]))).path).toBe('am');
      expect(Buffer.from(back.bytes).equals(v.read(65536, 4096))).toBe(true);
      agent.deregister(v);
      agent.deregister(h);
    } finally {
      await other.close();
    }
  });

  it('metadata with host memory on a device, a CUDA IPC handle on host memory, or a device id past 1023 does not load', async () => {
    const other = await Agent.create({ name: 'strict-loader' });
    const v = agent.allocate(2 * MiB, { name: 'strict-v', memory: 'vram' });
    const h = agent.register(Buffer.alloc(4096), { name: 'strict-h' });
    try {
      const md = Buffer.from(agent.metadata());
      const forge = (change: (v: RawRegion, h: RawRegion) => void) =>
        reencodeMetadata(md, (regions) => {
          const names = regions.map((r) => r.fixed.subarray(5, 5 + r.fixed[4]).toString());
          change(regions[names.indexOf('strict-v')], regions[names.indexOf('strict-h')]);
        });
      const setDevice = (r: RawRegion, device: number) => {
        const f = Buffer.from(r.fixed);
        f.writeUInt32LE(device, 4 + 1 + f[4] + 3); // after id, name, kind, access, flags
        r.fixed = f;
      };
      expect(v.exported).toBe(true);
      for (const [blob, pattern] of [
        [forge((_, host) => setDevice(host, 1)), /'strict-h'\): host memory with device id 1/],
        [forge((vram, host) => (host.sections = vram.sections)), /'strict-h'\): a CUDA IPC handle on host memory/],
        [forge((vram) => setDevice(vram, 1024)), /'strict-v'\): device id 1024 \(at most 1023\)/],
      ] as const) {
        const e = thrown(() => other.loadPeer(blob));
        expect(e.code).toBe('ERR_INVALID_PARAM');
        expect(e.message).toMatch(pattern);
      }
      expect(other.loadPeer(forge(() => {})).region('strict-v').kind).toBe('vram'); // the unforged re-encoding loads
    } finally {
      agent.deregister(v);
      agent.deregister(h);
      await other.close();
    }
  });

  it("a VRAM region is published with its kind and device; two agents of one process cannot use CUDA IPC between them ('auto' then takes 'am')", async () => {
    const other = await Agent.create({ name: 'vram-other' });
    try {
      const v = agent.allocate(MiB, { name: 'pub', memory: 'vram', device: DEV1 });
      const peer = other.loadPeer(agent.metadata());
      expect(peer.region('pub').kind).toBe('vram');
      expect(peer.region('pub').device).toBe(DEV1);
      const mine = other.allocate(MiB, { name: 'mine', memory: 'vram' });
      mine.write(0, random(14, 4096));
      // Four at once, queued behind the handshake: each falls back, not only the one that tried the handle.
      mine.write(0, random(14, 4 * 4096));
      const firsts = await Promise.all(
        [0, 1, 2, 3].map((i) =>
          other.write(mine.descriptors([i * 4096], [4096]), peer.region('pub').descriptors([i * 4096], [4096])).catch((x) => x),
        ),
      );
      for (const f of firsts) expect(f).not.toBeInstanceOf(Error);
      expect(v.read(0, 4 * 4096).equals(mine.read(0, 4 * 4096))).toBe(true);
      const first = firsts[0];
      if (GPU && first.path === 'cuda_ipc') return agent.deregister(v); // this driver opens handles in their own process
      // The handle did not open here: 'auto' fell back to active messages, and takes them from now on;
      // cuda_ipc asked for by name says why it cannot.
      expect(firsts.map((f) => f.path)).toEqual(['am', 'am', 'am', 'am']);
      expect((await other.write(mine.descriptors([0], [4096]), peer.region('pub').descriptors([8192], [4096]))).path).toBe('am');
      const e = await other.write(mine.descriptors([0], [4096]), peer.region('pub').descriptors([0], [4096]), { path: 'cuda_ipc' }).catch((x) => x);
      expect(e).toBeInstanceOf(KvwireError);
      expect(e.code).toBe('ERR_UNAVAILABLE');
      expect(e.message).toMatch(/does not open here .*in this same process/);
      agent.deregister(v);
    } finally {
      await other.close();
    }
  });
});

describe(`path cuda_ipc between processes (${GPU ? 'real CUDA driver' : 'CUDA test double'})`, () => {
  const SIZE = 8 * MiB;
  let gpu: PeerProcess; // VRAM region 'kv' on device 0
  let hostAllocated: PeerProcess; // kvwire-allocated host memory (mapped by same-host peers)
  let hostRegistered: PeerProcess; // a registered Buffer
  let agent: Agent;
  let peers: Record<string, Peer>;
  let vram: Region;
  let vram1: Region;
  let dram: Region;

  beforeAll(async () => {
    gpu = new PeerProcess('gpu', DOUBLE);
    hostAllocated = new PeerProcess('host-allocated', DOUBLE);
    hostRegistered = new PeerProcess('host-registered', DOUBLE);
    await Promise.all([
      gpu.init({ memory: 'vram', size: SIZE }),
      hostAllocated.init({ memory: 'allocated', size: SIZE }),
      hostRegistered.init({ memory: 'registered', size: SIZE }),
    ]);
    agent = await Agent.create({ name: 'initiator' });
    peers = {};
    for (const p of [gpu, hostAllocated, hostRegistered]) peers[p.name] = agent.loadPeer(Buffer.from(p.metadata, 'base64'));
    vram = agent.allocate(SIZE, { name: 'vram', memory: 'vram' });
    vram1 = agent.allocate(SIZE, { name: 'vram1', memory: 'vram', device: DEV1 });
    dram = agent.register(Buffer.alloc(SIZE), { name: 'dram' });
    vram.write(0, random(3, SIZE));
    vram1.write(0, random(4, SIZE));
    dram.bytes.set(random(5, SIZE));
  });
  afterAll(async () => {
    await agent?.close();
    await Promise.all([gpu, hostAllocated, hostRegistered].map((p) => p?.close()));
  });

  for (const count of [1, 64, 10_000]) {
    it(`VRAM -> peer VRAM WRITE and back by READ, ${count} scattered descriptors, notification after the data`, async () => {
      const lengths = count === 1 ? [MiB] : mixedLengths(count, count, 64, count === 64 ? 65536 : 512);
      const local = place(count + 1, lengths, SIZE);
      const remote = place(count + 2, lengths, SIZE);
      const note = JSON.stringify({ offsets: remote, lengths });
      const arrived = gpu.waitEvent('notification', 10_000, (m) => m.message === note);
      const batches = agent.health.gpuKernelBatches;
      const want = hashOf(vram, local, lengths);
      const stats = await agent.write(vram.descriptors(local, lengths), peers.gpu.region('kv').descriptors(remote, lengths), { notify: note });
      expect(stats.path).toBe('cuda_ipc');
      expect(stats.descriptors).toBe(count);
      // The peer hashed its ranges when the notification arrived: the data was there before it, and
      // the source is unchanged (a copy the wrong way round would pass a comparison of the two sides).
      expect((await arrived).hash).toBe(want);
      expect(hashOf(vram, local, lengths)).toBe(want);
      // Back into other places of a VRAM region on the other device (holding other bytes before).
      const back = place(count + 3, lengths, SIZE);
      expect(hashOf(vram1, back, lengths)).not.toBe(want);
      const read = await agent.read(vram1.descriptors(back, lengths), peers.gpu.region('kv').descriptors(remote, lengths));
      expect(read.path).toBe('cuda_ipc');
      expect(hashOf(vram1, back, lengths)).toBe(want);
      expect((await gpu.ok('hash', { offsets: remote, lengths })).hash).toBe(want);
      // Many runs go as one launch of the copy kernel each way (its run table built here, executed by
      // the double as the kernel's contract says); a single run as one CUDA copy.
      expect(agent.health.gpuKernelBatches - batches).toBe(count === 1 ? 0 : 2);
    });
  }

  it('host memory <-> peer VRAM, both ways', async () => {
    const lengths = mixedLengths(7, 300, 4096, 16384);
    const local = place(8, lengths, SIZE);
    const remote = place(9, lengths, SIZE);
    await agent.write(dram.descriptors(local, lengths), peers.gpu.region('kv').descriptors(remote, lengths));
    expect((await gpu.ok('hash', { offsets: remote, lengths })).hash).toBe(hashOf(dram, local, lengths));
    const back = place(10, lengths, SIZE);
    const fresh = agent.register(Buffer.alloc(SIZE), { name: 'fresh' });
    const s = await agent.read(fresh.descriptors(back, lengths), peers.gpu.region('kv').descriptors(remote, lengths));
    expect(s.path).toBe('cuda_ipc');
    expect(hashOf(fresh, back, lengths)).toBe(hashOf(dram, local, lengths));
    agent.deregister(fresh);
  });

  it("VRAM <-> a same-host peer's kvwire-allocated host memory, both ways; its registered host memory by 'am' (cuda_ipc refused with the reason)", async () => {
    const lengths = mixedLengths(11, 100, 4096, 65536);
    const local = place(12, lengths, SIZE);
    const remote = place(13, lengths, SIZE);
    const w = await agent.write(vram.descriptors(local, lengths), peers['host-allocated'].region('kv').descriptors(remote, lengths));
    expect(w.path).toBe('cuda_ipc');
    expect((await hostAllocated.ok('hash', { offsets: remote, lengths })).hash).toBe(hashOf(vram, local, lengths));
    await hostAllocated.ok('fill', { seed: 77 });
    const back = place(14, lengths, SIZE);
    await agent.read(vram1.descriptors(back, lengths), peers['host-allocated'].region('kv').descriptors(remote, lengths));
    expect(hashOf(vram1, back, lengths)).toBe((await hostAllocated.ok('hash', { offsets: remote, lengths })).hash);
    const e = await agent
      .write(vram.descriptors([0], [4096]), peers['host-registered'].region('kv').descriptors([0], [4096]), { path: 'cuda_ipc' })
      .catch((x) => x);
    expect(e.code).toBe('ERR_UNAVAILABLE');
    expect(e.message).toMatch(/only when it is mapped into this process/);
    // 'auto' moves it by active messages instead (VRAM staged through host memory here).
    const s = await agent.write(vram.descriptors(local, lengths), peers['host-registered'].region('kv').descriptors(remote, lengths));
    expect(s.path).toBe('am');
    expect((await hostRegistered.ok('hash', { offsets: remote, lengths })).hash).toBe(hashOf(vram, local, lengths));
  });

  it("forged VRAM_REVOKEs (guessed connection nonces) and VRAM_REVOKE_ACKs from a stranger change nothing: the initiator keeps copying", async () => {
    const region = peers.gpu.region('kv');
    await agent.write(vram.descriptors([0], [4096]), region.descriptors([0], [4096]));
    const sent = await runHostileTool('tcp', agent.metadata(), 'vramrevoke', String(region.id), '2000');
    expect(sent).toBeGreaterThanOrEqual(4000);
    // Both ends of the real connection keep going.
    await gpu.ok('fill', { seed: 61 });
    const s = await agent.read(vram.descriptors([8192], [4096]), region.descriptors([8192], [4096]));
    expect(s.path).toBe('cuda_ipc');
    expect(hashOf(vram, [8192], [4096])).toBe((await gpu.ok('hash', { offsets: [8192], lengths: [4096] })).hash);
    expect((await runHostileTool('tcp', Buffer.from(gpu.metadata, 'base64'), 'vramrevoke', String(region.id), '500'))).toBeGreaterThan(0);
    expect((await gpu.ok('health')).health.retiredRegions).toBe(0);
  });

  it('host paths refuse VRAM, and cuda_ipc refuses host memory on both sides', async () => {
    for (const path of ['direct', 'cma', 'rma'] as const) {
      const e = await agent.write(vram.descriptors([0], [64]), peers.gpu.region('kv').descriptors([0], [64]), { path }).catch((x) => x);
      expect(e.code, path).toBe('ERR_UNAVAILABLE');
      expect(e.message).toMatch(new RegExp(`path '${path}' moves host memory only; VRAM moves by path 'cuda_ipc' \\(peers on one host\\) or 'am'`));
    }
    const e = await agent.write(dram.descriptors([0], [64]), peers['host-allocated'].region('kv').descriptors([0], [64]), { path: 'cuda_ipc' }).catch((x) => x);
    expect(e.code).toBe('ERR_UNAVAILABLE');
    expect(e.message).toMatch(/both regions are host memory/);
  });

  it('metadata that claims more VRAM than the IPC handle maps, or carries a damaged handle, is refused and nothing is copied', async () => {
    const plain = Buffer.from(gpu.metadata, 'base64');
    await gpu.ok('fill', { seed: 21 });
    const before = (await gpu.ok('hash', { offsets: [0], lengths: [SIZE] })).hash;
    const wider = Buffer.from(plain);
    const at = firstRegionLengthOffset(wider);
    wider.writeBigUInt64LE(BigInt(SIZE) + 4096n, at);
    const damaged = Buffer.from(plain);
    const section = damaged.indexOf(Buffer.from('cuda-ipc'));
    expect(section).toBeGreaterThan(0);
    damaged[section + 8 + 4 + 40] ^= 0xff; // a byte of the handle itself
    // The wider region is refused by the size of what the IPC handle maps here.
    const widerRefusal = /claims 8392704 bytes at offset 0 of an allocation of which 8388608 bytes were mapped here/;
    // (What a damaged handle does to a real driver is its own business: the double's check only.)
    for (const [blob, codes, pattern, wide] of [
      [reseal(wider), ['ERR_INVALID_PARAM'], widerRefusal, true],
      ...(GPU ? [] : [[reseal(damaged), ['ERR_UNAVAILABLE'], /does not open here/, false]]),
    ] as const) {
      const fresh = await Agent.create({ name: 'forged-loader' });
      try {
        const peer = fresh.loadPeer(blob);
        const mine = fresh.allocate(SIZE + 4096, { name: 'mine', memory: 'vram' });
        // Inside the length the metadata claims, past what the handle maps; or anywhere, for the damaged handle.
        const at = wide ? SIZE : 0;
        const e = await fresh.write(mine.descriptors([at], [4096]), peer.region('kv').descriptors([at], [4096]), { path: 'cuda_ipc' }).catch((x) => x);
        expect(codes).toContain(e.code);
        expect(e.message).toMatch(pattern);
        // Asked again, the same answer (the failure is remembered with its code, not as another one).
        const again = await fresh.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]), { path: 'cuda_ipc' }).catch((x) => x);
        expect(again.code).toBe(e.code);
        expect(again.message).toMatch(pattern);
        // 'auto' then goes by active messages, where the target checks the range against its own
        // region: past it refused, inside it served.
        const r = await fresh.read(mine.descriptors([at], [4096]), peer.region('kv').descriptors([at], [4096])).catch((x) => x);
        if (wide) {
          expect(r.code).toBe('ERR_INVALID_PARAM');
          expect(r.message).toMatch(/lies outside region 'kv'/);
        } else {
          expect(r.path).toBe('am');
          expect(hashOf(mine, [0], [4096])).toBe((await gpu.ok('hash', { offsets: [0], lengths: [4096] })).hash);
        }
      } finally {
        await fresh.close();
      }
    }
    expect((await gpu.ok('hash', { offsets: [0], lengths: [SIZE] })).hash).toBe(before);
  });

  for (const cma of [true, false]) {
    doubleOnly(`a VRAM region its owner deregistered is held while a GPU copy into it runs, then released; stale metadata then writes nothing (owner cma ${cma ? 'on' : 'off'})`, async () => {
      const owner = new PeerProcess(`owner-${cma}`, DOUBLE);
      const slow = new PeerProcess(`slow-writer-${cma}`, { ...DOUBLE, KVWIRE_CUDA_DOUBLE_COPY_DELAY_US: '500000' });
      try {
        await Promise.all([owner.init({ memory: 'vram', size: MiB, cma }), slow.init({ memory: 'vram', size: MiB, cma })]);
        await slow.ok('load', { metadata: owner.metadata });
        const write = (offset: number) =>
          slow.call('transfer', { peer: `owner-${cma}`, op: 'write', localOffsets: [0], remoteOffsets: [offset], lengths: [4096] });
        // Posted at once after loading the metadata (no grant of any kind awaited).
        const running = write(4096);
        await new Promise((res) => setTimeout(res, 100));
        await owner.ok('deregister');
        // The writer heard the revocation long ago (milliseconds), but its copy still runs (0.5 s
        // each) and it acknowledges only after: the owner still holds the memory.
        await new Promise((res) => setTimeout(res, 150));
        expect((await owner.ok('health')).health.retiredRegions).toBe(1);
        expect((await running).ok).toBe(true);
        const until = Date.now() + 3000;
        let health = (await owner.ok('health')).health;
        while (health.retiredRegions !== 0 && Date.now() < until) {
          await new Promise((res) => setTimeout(res, 50));
          health = (await owner.ok('health')).health;
        }
        expect(health.retiredRegions).toBe(0); // released once the writer acknowledged (well before the 5 s cap)
        expect(Date.now()).toBeLessThan(until);
        const stale = await write(8192);
        expect(stale.ok).toBe(false);
        expect(stale.error!.code).toBe('ERR_NOT_FOUND');
        expect(stale.error!.message).toMatch(/was deregistered by its owner; load its current metadata/);
      } finally {
        await Promise.all([owner.close(), slow.close()]);
      }
    });
  }

  doubleOnly('an initiator that closes while it owes a revocation acknowledgement (its copy running) closes cleanly, and the owner is released at once', async () => {
    const owner = new PeerProcess('owner-c', DOUBLE);
    const slow = new PeerProcess('slow-closer', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_COPY_DELAY_US: '500000' });
    try {
      await Promise.all([owner.init({ memory: 'vram', size: MiB }), slow.init({ memory: 'vram', size: MiB })]);
      await slow.ok('load', { metadata: owner.metadata });
      const running = slow.call('transfer', { peer: 'owner-c', op: 'write', localOffsets: [0], remoteOffsets: [0], lengths: [4096] });
      await new Promise((res) => setTimeout(res, 100));
      await owner.ok('deregister');
      await new Promise((res) => setTimeout(res, 20));
      const closed = await slow.ok('closeAgent'); // it crashed here once (an ACK sent on a closed endpoint)
      expect(closed.ms).toBeLessThan(2000);
      expect((await running).error?.code ?? 'OK').toMatch(/^(OK|ERR_CANCELED)$/);
      expect(slow.child.exitCode).toBeNull();
      expect(slow.child.signalCode).toBeNull();
      // Acknowledged as its copies ended (at close), or its BYE ended the wait: not the 5 s cap.
      const until = Date.now() + 1500;
      let health = (await owner.ok('health')).health;
      while (health.retiredRegions !== 0 && Date.now() < until) {
        await new Promise((res) => setTimeout(res, 50));
        health = (await owner.ok('health')).health;
      }
      expect(health.retiredRegions).toBe(0);
    } finally {
      await Promise.all([owner.close(), slow.close()]);
    }
  });

  it('an owner of VRAM closes promptly with a connected initiator (its revocations are acknowledged even as it closes)', async () => {
    const owner = new PeerProcess('owner-d', DOUBLE);
    const user = new PeerProcess('user-d', DOUBLE);
    try {
      await Promise.all([owner.init({ memory: 'vram', size: MiB }), user.init({ memory: 'vram', size: MiB })]);
      await user.ok('load', { metadata: owner.metadata });
      await user.ok('transfer', { peer: 'owner-d', op: 'write', localOffsets: [0], remoteOffsets: [0], lengths: [4096] });
      const closed = await owner.ok('closeAgent');
      expect(closed.ms).toBeLessThan(1000); // it waited out the 2 s close grace when the ACKs were dropped
    } finally {
      await Promise.all([owner.close(), user.close()]);
    }
  });

  it('a cuda_ipc transfer to a target that never answers its HELLO fails after the handshake time, not never', async () => {
    const stopped = new PeerProcess('stopped', DOUBLE);
    const fresh = await Agent.create({ name: 'hello-waiter' });
    try {
      await stopped.init({ memory: 'vram', size: MiB });
      stopProcess(stopped.child.pid!);
      const peer = fresh.loadPeer(Buffer.from(stopped.metadata, 'base64'));
      const mine = fresh.allocate(MiB, { name: 'mine', memory: 'vram' });
      const t0 = Date.now();
      const e = await fresh.write(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096])).catch((x) => x);
      expect(e.code).toBe('ERR_REMOTE_DISCONNECT');
      expect(e.message).toMatch(/did not answer this agent's HELLO within 3 s/);
      expect(Date.now() - t0).toBeLessThan(8000);
    } finally {
      stopped.child.kill('SIGCONT');
      await fresh.close();
      stopped.kill();
    }
  });

  doubleOnly('closing an agent during a GPU copy settles the transfer only after the copy has landed', async () => {
    const closing = new PeerProcess('closing', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_COPY_DELAY_US: '400000' });
    try {
      await closing.init({ memory: 'registered', size: MiB });
      await closing.ok('load', { metadata: gpu.metadata });
      await gpu.ok('fill', { seed: 41 });
      const want = (await gpu.ok('hash', { offsets: [0], lengths: [65536] })).hash;
      const r = await closing.ok('readThenClose', { peer: 'gpu', length: 65536, closeAfterMs: 50 });
      expect(r.code).toBe('ERR_CANCELED');
      expect(r.hash).toBe(want); // the bytes were there when the READ was rejected, not after
    } finally {
      await closing.close();
    }
  });

  doubleOnly('a failing GPU copy rejects the transfer with the driver error and the peer is not notified', async () => {
    const failing = new PeerProcess('failing', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_FAIL_COPIES: '1' });
    try {
      await failing.init({ memory: 'vram', size: MiB });
      await failing.ok('load', { metadata: gpu.metadata });
      const r = await failing.call('transfer', { peer: 'gpu', op: 'write', localOffsets: [0], remoteOffsets: [0], lengths: [4096], notify: 'must-not-arrive' });
      expect(r.ok).toBe(false);
      expect(r.error!.code).toBe('ERR_BACKEND');
      expect(r.error!.message).toMatch(/CUDA error 700/);
      // Sticky for the whole CUDA context: reported in health too.
      expect((await failing.ok('health')).health.gpuFault).toMatch(/CUDA error 700/);
      expect((await gpu.ok('health')).health.gpuFault).toBeNull();
      await new Promise((res) => setTimeout(res, 300));
      expect(gpu.notifications.some((n) => n.message === 'must-not-arrive')).toBe(false);
    } finally {
      await failing.close();
    }
  });

  doubleOnly('a deadline during a GPU copy settles ERR_TIMEOUT only once the copy has finished; a peer killed mid-copy leaves the initiator working', async () => {
    const slow = new PeerProcess('slow', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_COPY_DELAY_US: '400000' });
    const victim = new PeerProcess('victim', DOUBLE);
    try {
      await Promise.all([slow.init({ memory: 'vram', size: MiB }), victim.init({ memory: 'vram', size: MiB })]);
      await slow.ok('load', { metadata: gpu.metadata });
      await slow.ok('load', { metadata: victim.metadata });
      // Each GPU copy takes 0.4 s here: the notification must still arrive after the data.
      await slow.ok('fill', { seed: 31 });
      const note = JSON.stringify({ offsets: [65536], lengths: [4096] });
      const arrived = gpu.waitEvent('notification', 10_000, (m) => m.message === note);
      await slow.ok('transfer', { peer: 'gpu', op: 'write', localOffsets: [8192], remoteOffsets: [65536], lengths: [4096], notify: note });
      expect((await arrived).hash).toBe((await slow.ok('hash', { offsets: [8192], lengths: [4096] })).hash);
      const t0 = Date.now();
      const r = await slow.call('transfer', { peer: 'gpu', op: 'write', localOffsets: [0], remoteOffsets: [0], lengths: [4096], deadlineMs: 50 });
      expect(r.error?.code).toBe('ERR_TIMEOUT');
      expect(Date.now() - t0).toBeGreaterThanOrEqual(390);
      const killed = slow.call('transfer', { peer: 'victim', op: 'read', localOffsets: [0], remoteOffsets: [0], lengths: [65536] });
      await new Promise((res) => setTimeout(res, 100));
      victim.kill();
      const settled = await killed; // the mapping stays valid here: it completes, or fails as disconnected
      if (!settled.ok) expect(settled.error!.code).toBe('ERR_REMOTE_DISCONNECT');
      const after = await slow.call('transfer', { peer: 'gpu', op: 'read', localOffsets: [0], remoteOffsets: [4096], lengths: [4096] });
      expect(after.ok).toBe(true);
      expect(after.stats.path).toBe('cuda_ipc');
    } finally {
      await Promise.all([slow.close(), victim.close()]);
    }
  });
});

// Across hosts VRAM moves by active messages: each end moves its own VRAM, through UCX with its
// memory type where UCX has CUDA support, else staged through host memory by kvwire (this machine's
// UCX builds have none, and the double is invisible to UCX: a device address given to UCX here would
// be read as host memory and fault). Two processes over tcp, as two hosts would talk.
// On a GPU the suite runs twice: UCX with tcp alone (no CUDA memory type in UCX: kvwire stages) and
// with cuda_copy (UCX takes device memory).
for (const transports of GPU ? ['tcp', 'tcp,cuda_copy'] : ['tcp'])
describe(`VRAM by path 'am' between processes over ${transports} (${GPU ? 'real CUDA driver' : 'CUDA test double'})`, () => {
  const SIZE = 8 * MiB;
  // Whether this UCX takes device memory (else every VRAM byte is staged by kvwire).
  const throughUcx: boolean = /handed to UCX/.test(info({ ...DOUBLE, UCX_TLS: transports }).paths.find((x: any) => x.path === 'am (VRAM, any host)').detail);
  let gpu: PeerProcess; // VRAM region 'kv'
  let host: PeerProcess; // a registered Buffer
  let agent: Agent;
  let peers: Record<string, Peer>;
  let vram: Region;
  let vram1: Region;
  let dram: Region;

  beforeAll(async () => {
    gpu = new PeerProcess('tcp-gpu', DOUBLE);
    host = new PeerProcess('tcp-host', DOUBLE);
    await Promise.all([
      gpu.init({ memory: 'vram', size: SIZE, transports }),
      host.init({ memory: 'registered', size: SIZE, transports }),
    ]);
    agent = await Agent.create({ name: 'tcp-initiator', ucx: { transports } });
    peers = {};
    for (const p of [gpu, host]) peers[p.name] = agent.loadPeer(Buffer.from(p.metadata, 'base64'));
    vram = agent.allocate(SIZE, { name: 'vram', memory: 'vram' });
    vram1 = agent.allocate(SIZE, { name: 'vram1', memory: 'vram', device: DEV1 });
    dram = agent.register(Buffer.alloc(SIZE), { name: 'dram' });
    vram.write(0, random(23, SIZE));
    vram1.write(0, random(24, SIZE));
    dram.bytes.set(random(25, SIZE));
  });
  afterAll(async () => {
    await agent?.close();
    await Promise.all([gpu, host].map((p) => p?.close()));
  });

  // 1 MiB goes by rendezvous, 64 mixed up to 64 KiB as single messages, 10,000 small ones packed.
  for (const count of [1, 64, 10_000]) {
    it(`VRAM -> peer VRAM WRITE and back by READ, ${count} scattered descriptors, notification after the data`, async () => {
      const lengths = count === 1 ? [MiB] : mixedLengths(count + 40, count, 64, count === 64 ? 65536 : 512);
      const local = place(count + 41, lengths, SIZE);
      const remote = place(count + 42, lengths, SIZE);
      const note = JSON.stringify({ offsets: remote, lengths });
      const arrived = gpu.waitEvent('notification', 10_000, (m) => m.message === note);
      const want = hashOf(vram, local, lengths);
      const staged = agent.health.vramStagedBytes;
      const w = await agent.write(vram.descriptors(local, lengths), peers['tcp-gpu'].region('kv').descriptors(remote, lengths), { path: 'am', notify: note });
      expect(w.path).toBe('am');
      expect((await arrived).hash).toBe(want); // the data was in the peer's VRAM when it was told
      expect(hashOf(vram, local, lengths)).toBe(want);
      const back = place(count + 43, lengths, SIZE);
      expect(hashOf(vram1, back, lengths)).not.toBe(want);
      const r = await agent.read(vram1.descriptors(back, lengths), peers['tcp-gpu'].region('kv').descriptors(remote, lengths), { path: 'am' });
      expect(r.path).toBe('am');
      expect(hashOf(vram1, back, lengths)).toBe(want);
      // Staged by kvwire: every byte out and every byte in, once. Through UCX: a lone 1 MiB segment
      // never touches host memory here.
      const total = lengths.reduce((a, b) => a + b, 0);
      const delta = agent.health.vramStagedBytes - staged;
      if (!throughUcx) expect(delta).toBe(2 * total);
      else if (count === 1) expect(delta).toBe(0);
      else expect(delta).toBeLessThanOrEqual(2 * total);
    });
  }

  it('host memory <-> peer VRAM and VRAM <-> peer host memory, both ways', async () => {
    const lengths = mixedLengths(51, 200, 512, 131072);
    const local = place(52, lengths, SIZE);
    const remote = place(53, lengths, SIZE);
    await agent.write(dram.descriptors(local, lengths), peers['tcp-gpu'].region('kv').descriptors(remote, lengths), { path: 'am' });
    expect((await gpu.ok('hash', { offsets: remote, lengths })).hash).toBe(hashOf(dram, local, lengths));
    const fresh = agent.register(Buffer.alloc(SIZE), { name: 'fresh' });
    await agent.read(fresh.descriptors(local, lengths), peers['tcp-gpu'].region('kv').descriptors(remote, lengths), { path: 'am' });
    expect(hashOf(fresh, local, lengths)).toBe(hashOf(dram, local, lengths));
    agent.deregister(fresh);
    // A peer's registered Buffer on this host: 'auto' picks 'am' (cuda_ipc needs it mapped here).
    const w = await agent.write(vram.descriptors(local, lengths), peers['tcp-host'].region('kv').descriptors(remote, lengths));
    expect(w.path).toBe('am');
    expect((await host.ok('hash', { offsets: remote, lengths })).hash).toBe(hashOf(vram, local, lengths));
    await host.ok('fill', { seed: 54 });
    await agent.read(vram1.descriptors(local, lengths), peers['tcp-host'].region('kv').descriptors(remote, lengths));
    expect(hashOf(vram1, local, lengths)).toBe((await host.ok('hash', { offsets: remote, lengths })).hash);
  });

  it("a peer on another host (its VRAM's boot id differs): 'auto' moves it by 'am', and cuda_ipc is refused with the reason", async () => {
    const elsewhere = Buffer.from(gpu.metadata, 'base64');
    const section = elsewhere.indexOf(Buffer.from('cuda-ipc'));
    expect(section).toBeGreaterThan(0);
    const hostId = section + 8 + 4 + 64 + 8; // name, length, IPC handle, offset
    expect(elsewhere.readUInt32LE(section + 8)).toBe(64 + 8 + 16);
    elsewhere[hostId] ^= 0xff;
    const fresh = await Agent.create({ name: 'other-host-view', ucx: { transports } });
    try {
      const peer = fresh.loadPeer(reseal(elsewhere));
      const mine = fresh.allocate(MiB, { name: 'mine', memory: 'vram' });
      mine.write(0, random(55, 65536));
      const e = await fresh.write(mine.descriptors([0], [65536]), peer.region('kv').descriptors([0], [65536]), { path: 'cuda_ipc' }).catch((x) => x);
      expect(e.code).toBe('ERR_UNAVAILABLE');
      expect(e.message).toMatch(/is on another host \(its boot id differs from this host's\): use path 'am'/);
      const w = await fresh.write(mine.descriptors([0], [65536]), peer.region('kv').descriptors([0], [65536]));
      expect(w.path).toBe('am');
      expect((await gpu.ok('hash', { offsets: [0], lengths: [65536] })).hash).toBe(hashOf(mine, [0], [65536]));
    } finally {
      await fresh.close();
    }
  });

  doubleOnly('a failing GPU copy on the way out rejects the WRITE with the driver error before anything is sent', async () => {
    const failing = new PeerProcess('tcp-failing', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_FAIL_COPIES: '1' });
    try {
      await failing.init({ memory: 'vram', size: MiB, transports });
      await failing.ok('load', { metadata: gpu.metadata });
      const r = await failing.call('transfer', { peer: 'tcp-gpu', op: 'write', path: 'am', localOffsets: [0], remoteOffsets: [0], lengths: [4096], notify: 'must-not-arrive-am' });
      expect(r.ok).toBe(false);
      expect(r.error!.code).toBe('ERR_BACKEND');
      expect(r.error!.message).toMatch(/CUDA error 700/);
      expect((await failing.ok('health')).health.gpuFault).toMatch(/CUDA error 700/);
      await new Promise((res) => setTimeout(res, 300));
      expect(gpu.notifications.some((n) => n.message === 'must-not-arrive-am')).toBe(false);
    } finally {
      await failing.close();
    }
  });

  doubleOnly('a target killed while it copies its VRAM out for a READ: the initiator gets ERR_REMOTE_DISCONNECT and keeps working', async () => {
    const victim = new PeerProcess('tcp-victim', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_COPY_DELAY_US: '400000' });
    try {
      await victim.init({ memory: 'vram', size: MiB, transports });
      const peer = agent.loadPeer(Buffer.from(victim.metadata, 'base64'));
      const reading = agent.read(vram.descriptors([0], [65536]), peer.region('kv').descriptors([0], [65536]), { path: 'am' }).catch((x) => x);
      await new Promise((res) => setTimeout(res, 150));
      victim.kill();
      const e = await reading;
      expect(e.code).toBe('ERR_REMOTE_DISCONNECT');
      const r = await agent.read(vram.descriptors([0], [4096]), peers['tcp-gpu'].region('kv').descriptors([0], [4096]), { path: 'am' });
      expect(r.path).toBe('am');
    } finally {
      await victim.close();
    }
  });

  it.skipIf(throughUcx)("batches larger than the target's staging (4 MiB a connection here) wait for it instead of failing; one READ or one segment larger is refused, naming the limit", async () => {
    const small = new PeerProcess('tcp-small', { ...DOUBLE, KVWIRE_VRAM_STAGING_LIMIT: String(4 * MiB) });
    const big = agent.allocate(32 * MiB, { name: 'big', memory: 'vram' });
    try {
      await small.init({ memory: 'vram', size: 32 * MiB, transports });
      const peer = agent.loadPeer(Buffer.from(small.metadata, 'base64'));
      const region = peer.region('kv');
      big.write(0, random(61, 32 * MiB));
      // 16 MiB in 1 MiB segments, every one staged at the target: at most 4 MiB at a time.
      const offsets = [...Array(16).keys()].map((i) => i * 2 * MiB);
      const lengths = offsets.map(() => MiB);
      const w = await agent.write(big.descriptors(offsets, lengths), region.descriptors(offsets, lengths), { path: 'am' });
      expect(w.segments).toBe(16);
      expect((await small.ok('hash', { offsets, lengths })).hash).toBe(hashOf(big, offsets, lengths));
      // Four READs of 3 MiB at once: together past the limit, so some wait; all complete.
      const reads = [0, 1, 2, 3].map((k) => {
        const at = offsets.slice(3 * k, 3 * k + 3);
        const into = at.map((o) => o + MiB); // the odd MiBs of 'big', unwritten so far
        return agent.read(big.descriptors(into, [MiB, MiB, MiB]), region.descriptors(at, [MiB, MiB, MiB]), { path: 'am' }).then(() => ({ at, into }));
      });
      for (const { at, into } of await Promise.all(reads))
        expect(hashOf(big, into, [MiB, MiB, MiB])).toBe((await small.ok('hash', { offsets: at, lengths: [MiB, MiB, MiB] })).hash);
      const tooBigRead = await agent.read(big.descriptors([0, 2 * MiB], [3 * MiB, 2 * MiB]), region.descriptors([0, 4 * MiB], [3 * MiB, 2 * MiB]), { path: 'am' }).catch((x) => x);
      expect(tooBigRead.code).toBe('ERR_UNAVAILABLE');
      expect(tooBigRead.message).toMatch(/5242880 bytes at once \(one READ, or one segment\) are more than the 4 MiB a connection may stage/);
      const tooBigSegment = await agent.write(big.descriptors([0], [5 * MiB]), region.descriptors([0], [5 * MiB]), { path: 'am' }).catch((x) => x);
      expect(tooBigSegment.code).toBe('ERR_UNAVAILABLE');
      expect(tooBigSegment.index).toBe(0);
      expect(tooBigSegment.message).toMatch(/more than the 4 MiB a connection may stage/);
      // Nothing was left held: the whole allowance is there again.
      const again = await agent.write(big.descriptors([0, 8 * MiB], [2 * MiB, 2 * MiB]), region.descriptors([0, 8 * MiB], [2 * MiB, 2 * MiB]), { path: 'am' });
      expect(again.path).toBe('am');
      expect((await small.ok('hash', { offsets: [0, 8 * MiB], lengths: [2 * MiB, 2 * MiB] })).hash).toBe(hashOf(big, [0, 8 * MiB], [2 * MiB, 2 * MiB]));
    } finally {
      agent.deregister(big);
      await small.close();
    }
  });

  doubleOnly('failing GPU copies at the target (a WRITE into its VRAM, a READ out of it) and at an initiator reading into its VRAM reject with the driver error', async () => {
    const broken = new PeerProcess('tcp-broken', { ...DOUBLE, KVWIRE_CUDA_DOUBLE_FAIL_COPIES: '1' });
    try {
      await broken.init({ memory: 'vram', size: MiB, transports });
      const peer = agent.loadPeer(Buffer.from(broken.metadata, 'base64'));
      for (const length of [4096, 256 * 1024]) { // eager and rendezvous
        const w = await agent.write(vram.descriptors([0], [length]), peer.region('kv').descriptors([0], [length]), { path: 'am' }).catch((x) => x);
        expect(w.code, `write ${length}`).toBe('ERR_BACKEND');
        expect(w.message).toMatch(/CUDA error 700/);
        const r = await agent.read(vram.descriptors([0], [length]), peer.region('kv').descriptors([0], [length]), { path: 'am' }).catch((x) => x);
        expect(r.code, `read ${length}`).toBe('ERR_BACKEND');
        expect(r.message).toMatch(/CUDA error 700/);
      }
      const packed = mixedLengths(62, 50, 64, 512);
      const p = await agent.write(vram.descriptors(place(63, packed, MiB), packed), peer.region('kv').descriptors(place(64, packed, MiB), packed), { path: 'am' }).catch((x) => x);
      expect(p.code).toBe('ERR_BACKEND');
      expect((await broken.ok('health')).health.gpuFault).toMatch(/CUDA error 700/);
      // The broken one reading into its own VRAM: packed, eager and rendezvous data all fail there.
      await broken.ok('load', { metadata: gpu.metadata });
      for (const lengths of [packed, [4096], [256 * 1024]]) {
        const r = await broken.call('transfer', { peer: 'tcp-gpu', op: 'read', path: 'am', localOffsets: place(65, lengths, MiB), remoteOffsets: place(66, lengths, MiB), lengths });
        expect(r.ok).toBe(false);
        expect(r.error!.code).toBe('ERR_BACKEND');
      }
    } finally {
      await broken.close();
    }
  });

  it('KVWIRE_VRAM_STAGING_LIMIT that is not a byte count from 1 MiB is refused when the agent is created', () => {
    const script = `const { Agent } = require(${JSON.stringify(path.join(__dirname, '..', 'dist'))});
      Agent.create({ name: 'bad-limit' }).then(() => console.log('created'), (e) => console.log(e.code + ': ' + e.message));`;
    for (const value of ['abc', '1000', '4MiB']) {
      const out = execFileSync(process.execPath, ['-e', script], { env: { ...process.env, KVWIRE_VRAM_STAGING_LIMIT: value }, encoding: 'utf8' });
      expect(out).toMatch(/^ERR_INVALID_PARAM: KVWIRE_VRAM_STAGING_LIMIT '.*': bytes of VRAM staging per connection, from 1048576/);
    }
  });

  doubleOnly('a READ that would stage more than 1 GiB for one connection is refused by the target with the limit, and the connection goes on', async () => {
    const big = new PeerProcess('tcp-big', DOUBLE);
    const fresh = await Agent.create({ name: 'big-reader', ucx: { transports } });
    try {
      const bytes = 1024 * MiB + 4096;
      await big.init({ memory: 'vram', size: bytes, transports });
      const peer = fresh.loadPeer(Buffer.from(big.metadata, 'base64'));
      const into = fresh.allocate(bytes, { name: 'into' }); // host memory: untouched pages cost nothing
      const e = await fresh.read(into.descriptors([0], [bytes]), peer.region('kv').descriptors([0], [bytes]), { path: 'am' }).catch((x) => x);
      expect(e.code).toBe('ERR_UNAVAILABLE');
      expect(e.message).toMatch(/1073745920 bytes at once \(one READ, or one segment\) are more than the 1024 MiB a connection may stage/);
      into.bytes.set(random(56, 4096));
      await fresh.write(into.descriptors([0], [4096]), peer.region('kv').descriptors([4096], [4096]), { path: 'am' });
      await fresh.read(into.descriptors([8192], [4096]), peer.region('kv').descriptors([4096], [4096]), { path: 'am' });
      expect(hashOf(into, [8192], [4096])).toBe(hashOf(into, [0], [4096]));
      expect((await big.ok('hash', { offsets: [4096], lengths: [4096] })).hash).toBe(hashOf(into, [0], [4096]));
    } finally {
      await fresh.close();
      await big.close();
    }
  });
});

describe('kvwire bench with VRAM cells', () => {
  doubleOnly('runs cuda_ipc cells VRAM<->VRAM and DRAM<->VRAM, labels the test double, and gives no GPU verdict from it', () => {
    const out = execFileSync(process.execPath, [CLI, 'bench', '--memory', 'vram,vram-dram', '--transport', 'shm', '--op', 'write,read',
      '--block', '64K', '--runs', '1', '--run-ms', '20', '--latency-samples', '20', '--idle-seconds', '0', '--no-baselines', '--json'],
    { env: { ...process.env, ...DOUBLE }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 120_000 });
    const r = JSON.parse(out);
    expect(r.cuda.testDouble).toMatch(/test double/);
    const cells = r.cells.filter((c: any) => c.block === 65536);
    expect(cells.map((c: any) => `${c.memory} ${c.op} ${c.path}`).sort()).toEqual(
      ['vram read cuda_ipc', 'vram write cuda_ipc', 'vram-dram read cuda_ipc', 'vram-dram write cuda_ipc']);
    for (const c of cells) expect(c.gbps).toBeGreaterThan(0);
    expect(r.latency.some((l: any) => l.memory === 'vram')).toBe(true);
    const g = r.targets.filter((t: any) => t.id.startsWith('G') && !t.measured.startsWith('not measured'));
    expect(g.map((t: any) => t.id)).toEqual(expect.arrayContaining(['G2', 'G3', 'G4', 'G5']));
    for (const t of g) {
      expect(t.met).toBeNull();
      expect(t.measured).toMatch(/CUDA test double, not a GPU: no verdict/);
    }
  });
});
