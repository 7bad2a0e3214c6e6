// A peer's UCX worker address is checked before UCX parses it (native/backends/ucx/address_check.h):
// ucp_ep_create takes no length and aborts the process on some malformed addresses. The fuzz tool
// (test/hostile/address_fuzz.cc) hands every address the check accepts to ucp_ep_create in a forked
// child, so a crash is counted instead of killing anything; with `all` it also tries the rejected
// ones, which shows what the check stops.
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../lib';
import { HOSTILE_TOOL, reseal, thrown } from './helpers';

const FUZZ_TOOL = path.join(path.dirname(HOSTILE_TOOL), 'kvwire_address_fuzz');
const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

async function fuzz(transports: string, cases: number, seed: number, all: boolean) {
  const { stdout } = await promisify(execFile)(FUZZ_TOOL, [String(cases), String(seed), ...(all ? ['all'] : [])], {
    // UCX_MM_ERROR_HANDLING as kvwire sets it: without it UCX never uses shared memory with peer
    // error handling, and the shared-memory attach path would go untested.
    env: { ...process.env, UCX_TLS: transports, UCX_MM_ERROR_HANDLING: 'y', UCX_WARN_UNUSED_ENV_VARS: 'n' },
    timeout: 120_000,
    maxBuffer: 1 << 24,
  });
  return JSON.parse(stdout.trim().split('\n').pop()!);
}

// Where the worker address lies in a plain metadata blob (native/core/metadata.cc): header 12, name
// str8, agent id and generation u64, backend str8, then the address as blob32.
function addressAt(blob: Buffer): number {
  let p = 12;
  p += 1 + blob[p];
  p += 16;
  p += 1 + blob[p];
  return p + 4;
}

describe('worker addresses are checked before UCX parses them', () => {
  for (const transports of ['shm,self,tcp', 'tcp']) {
    const cases = transports === 'tcp' ? 1200 : 3000;
    it(`${cases} mutated and random addresses (${transports}): none the check accepts crashes UCX; every real one is accepted; unchecked, many would`, { timeout: 180_000 }, async () => {
      const r = await fuzz(transports, cases, 17, true);
      const { reasons, ...summary } = r;
      console.log(`address fuzz (${transports}): ${JSON.stringify(summary)}; ${Object.keys(reasons).length} kinds of refusal`);
      expect(r.validRejected).toBe(0);
      expect(r.crashed).toBe(0);
      expect(r.accepted).toBeGreaterThan(cases / 10); // real addresses with harmless changes still pass
      expect(r.rejected).toBeGreaterThan(cases / 4);
      // The same candidates without the check: UCX aborts on a good share of them.
      expect(r.crashedRejected).toBeGreaterThan(cases / 40);
    });
  }

  // Both releases' tools exist where the UCX 1.22 smoke lane has built its second copy of the tree.
  const tools = ['build', 'build-ucx122'].map((dir) => path.join(__dirname, '..', dir, 'Release', 'kvwire_address_fuzz'));
  const both = tools.every((t) => existsSync(t));
  for (const transports of ['shm,self,tcp', 'tcp']) {
    it.skipIf(!both)(`a live peer's address from the other UCX release (1.13 <-> 1.22) is accepted, or refused saying why (${transports}${both ? '' : '; needs both builds, as in the UCX 1.22 smoke lane'})`, async () => {
      const env = { ...process.env, UCX_TLS: transports, UCX_MM_ERROR_HANDLING: 'y', UCX_WARN_UNUSED_ENV_VARS: 'n' };
      const verdicts: Record<string, { accepted: boolean; reason: string; connect: string }> = {};
      for (const [from, by] of [tools, [...tools].reverse()]) {
        const peer = spawn(from, ['print', '5000'], { env, stdio: ['ignore', 'pipe', 'ignore'] });
        const hex = await new Promise<string>((resolve) => peer.stdout!.once('data', (d) => resolve(String(d).trim().split('\n')[0])));
        const { stdout } = await promisify(execFile)(by, ['check', hex], { env, timeout: 30_000 });
        verdicts[`${path.basename(path.dirname(path.dirname(from)))} -> ${path.basename(path.dirname(path.dirname(by)))}`] = JSON.parse(stdout.trim().split('\n').pop()!);
        peer.kill();
      }
      console.log(`cross-release addresses (${transports}): ${JSON.stringify(verdicts)}`);
      for (const v of Object.values(verdicts)) {
        expect(v.connect).toBe('ok'); // a real address: UCX takes it
        // Accepted, or refused for the one real incompatibility: UCX 1.13's shared-memory FIFO (64
        // entries) is smaller than 1.22's (256), and UCX maps a peer's FIFO at its own size.
        if (!v.accepted) expect(v.reason).toMatch(/FIFO smaller than this process's \(peers must run the same UCX release/);
      }
      if (transports === 'tcp') expect(Object.values(verdicts).every((v) => v.accepted)).toBe(true);
    });
  }

  it('loadPeer refuses a well-formed, correctly checksummed blob whose worker address is malformed, with ERR_INVALID_PARAM naming it', async () => {
    const transports = 'shm,self';
    const target = await Agent.create({ name: 'addr-md-target', ucx: { transports } });
    const loader = await Agent.create({ name: 'addr-md-loader', ucx: { transports } });
    cleanup.push(() => target.close(), () => loader.close());
    target.allocate(4096, { name: 'kv' });
    const blob = Buffer.from(target.metadata());
    const at = addressAt(blob);
    const length = blob.readUInt32LE(at - 4);
    // A blob whose address is `address` instead (its length field and checksum made right).
    const withAddress = (address: Buffer) => {
      const size = Buffer.alloc(4);
      size.writeUInt32LE(address.length);
      const out = Buffer.concat([blob.subarray(0, at - 4), size, address, blob.subarray(at + length)]);
      out.writeUInt32LE(out.length - 12 - 8, 8); // the header's body length (header 12, checksum 8)
      return reseal(out);
    };
    const real = blob.subarray(at, at + length);
    const variants: [string, Buffer][] = [
      ['another format version', withAddress(Buffer.concat([Buffer.from([(real[0] & 0xf0) | 0x07]), real.subarray(1)]))],
      ['cut short', withAddress(real.subarray(0, length - 10))],
      ['followed by junk', withAddress(Buffer.concat([real, Buffer.from('junk')]))],
    ];
    for (const [what, bad] of variants) {
      const err = thrown(() => loader.loadPeer(bad));
      expect(err.code, what).toBe('ERR_INVALID_PARAM');
      expect(err.message, what).toMatch(/worker address is malformed/);
    }
    expect(loader.security.refusedAddresses).toBe(variants.length);
    // The real blob still loads and serves.
    const peer = loader.loadPeer(blob);
    const mine = loader.allocate(4096, { name: 'mine' });
    await loader.read(mine.descriptors([0], [4096]), peer.region('kv').descriptors([0], [4096]));
  });
});
