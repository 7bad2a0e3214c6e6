// Resources a careless caller or a peer could exhaust are bounded, and memory that could move away
// under UCX cannot: allocations the machine cannot hold are refused up front (nothing left behind),
// one notification limit holds on both sides, registered ArrayBuffers cannot be transferred away.
import { readdirSync, readFileSync, statfsSync } from 'node:fs';
import { MessageChannel } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, KvwireError, type Peer, type Region } from '../lib';
import { MAX_NOTIFY_BYTES } from '../lib/agent';
import { thrown } from './helpers';


/**
 * Shared-memory files that appeared since `before` and that no process maps: what a failed
 * allocation would leave behind. (Test files run in parallel: other agents create and remove
 * their own files meanwhile, mapped while in use.)
 */
async function leftInShm(before: string[]): Promise<string[]> {
  const mapped = () => {
    const names = new Set<string>();
    for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p)))
      try {
        for (const m of readFileSync(`/proc/${pid}/maps`, 'utf8').matchAll(/\/dev\/shm\/(\S+)/g)) names.add(m[1]);
      } catch {} // the process is gone
    return names;
  };
  let left: string[] = [];
  for (let i = 0; i < 20; i++) {
    const now = mapped();
    left = readdirSync('/dev/shm').filter((f) => !before.includes(f) && !now.has(f));
    if (!left.length) break;
    await new Promise((r) => setTimeout(r, 100)); // another agent may be creating or removing one
  }
  return left;
}

describe('bounded resources', () => {
  let a: Agent;
  let b: Agent;
  let peer: Peer;
  let remote: Region;
  beforeAll(async () => {
    a = await Agent.create({ name: 'lim-a', ucx: { transports: 'shm,self' } });
    b = await Agent.create({ name: 'lim-b', ucx: { transports: 'shm,self' } });
    remote = b.allocate(1 << 16, { name: 'kv' });
    remote.bytes.fill(9);
    peer = a.loadPeer(b.metadata());
  });
  afterAll(async () => {
    await a.close();
    await b.close();
  });

  it('allocate() beyond what the machine can hold fails ERR_UNAVAILABLE at once and leaves no shared-memory file', async () => {
    const before = readdirSync('/dev/shm').sort();
    const started = performance.now();
    const huge = thrown(() => a.allocate(2 ** 52, { name: 'huge' }));
    expect(huge.code).toBe('ERR_UNAVAILABLE');
    expect(huge.message).toMatch(/can hold \d+ more/);
    // Just beyond the free space of /dev/shm, where UCX's shared memory lives (touching it would SIGBUS).
    const shm = statfsSync('/dev/shm');
    const beyond = thrown(() => a.allocate(shm.bavail * shm.bsize + (64 << 20), { name: 'beyond' }));
    expect(beyond.code).toBe('ERR_UNAVAILABLE');
    expect(performance.now() - started).toBeLessThan(1000);
    expect(await leftInShm(before)).toEqual([]);
    expect(a.allocate(1 << 20, { name: 'fits' }).length).toBe(1 << 20); // and the agent still works
  });

  it('one notification limit: 16 MiB passes, a byte more is refused (notify and a transfer\'s notify)', async () => {
    expect(MAX_NOTIFY_BYTES).toBe(16 << 20);
    const got = new Promise<number>((resolve) => b.once('notification', (n) => resolve(n.message.length)));
    await a.notify(peer, Buffer.alloc(MAX_NOTIFY_BYTES, 1));
    expect(await got).toBe(MAX_NOTIFY_BYTES);
    await expect(a.notify(peer, Buffer.alloc(MAX_NOTIFY_BYTES + 1))).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM' });
    const local = a.register(Buffer.alloc(4096), { name: 'small' });
    const t = a.write(local.descriptors([0], [16]), peer.region('kv').descriptors([0], [16]), { notify: Buffer.alloc(MAX_NOTIFY_BYTES + 1) });
    await expect(t).rejects.toMatchObject({ code: 'ERR_INVALID_PARAM', message: expect.stringContaining('notify') });
  });

  it('a registered ArrayBuffer cannot be transferred away: postMessage and structuredClone copy it, READ still lands in it', async () => {
    const ab = new ArrayBuffer(1 << 16);
    const region = a.register(ab, { name: 'transferable' });
    const copy = structuredClone(ab, { transfer: [ab] });
    const { port1, port2 } = new MessageChannel();
    port1.postMessage(ab, [ab]);
    port1.close();
    port2.close();
    expect(ab.byteLength).toBe(1 << 16); // still attached
    expect(copy.byteLength).toBe(1 << 16);
    await a.read(region.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]));
    expect(new Uint8Array(ab, 0, 4096).every((x) => x === 9)).toBe(true);
    expect(new Uint8Array(copy, 0, 4096).every((x) => x === 0)).toBe(true); // the copy is not written
  });

  it('a detached ArrayBuffer is refused at register', () => {
    const ab = new ArrayBuffer(4096);
    structuredClone(ab, { transfer: [ab] });
    const e = thrown(() => a.register(ab, { name: 'detached' }));
    expect(e.code).toBe('ERR_INVALID_PARAM');
    expect(e.message).toContain('detached');
  });
});
