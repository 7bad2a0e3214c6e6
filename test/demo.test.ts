// The main job runs in the suite with small settings and must report zero wrong bytes and errors.
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { KvLayout } from '../lib';
import { DEMO_SHAPE } from '../lib/cli/demo';
import { countWrongBytes, fillPool } from '../lib/cli/kv-content';
import { CUDA_DOUBLE } from './helpers';

const cli = path.join(__dirname, '..', 'dist', 'cli', 'index.js');
// One block across all layers and K/V, summed over the decode ranks: 32 x 2 x 16 x 8 x 128 x 2 bytes.
const BLOCK_ALL_LAYERS = 32 * 2 * 16 * 8 * 128 * 2;

function demo(...args: string[]) {
  return demoWith({}, ...args);
}

function demoWith(env: NodeJS.ProcessEnv, ...args: string[]) {
  const out = execFileSync(process.execPath, [cli, 'demo', '--json', ...args], { encoding: 'utf8', timeout: 90_000, env: { ...process.env, ...env } });
  return JSON.parse(out.trim().split('\n').pop()!);
}

describe('kvwire demo', () => {
  for (const [transport, tp, requests] of [
    ['shm', '1:1', '12'],
    ['tcp', '1:1', '8'],
    ['shm', '2:1', '4'],
    ['shm', '1:2', '4'],
  ]) {
    it(`moves and verifies every byte (${transport}, TP ${tp})`, () => {
      const result = demo('--transport', transport, '--tp', tp, '--requests', requests);
      expect(result).toMatchObject({ wrongBytes: 0, errors: 0, requests: Number(requests), tp });
      expect(result.blocks).toBeGreaterThanOrEqual(Number(requests));
      expect(result.bytes).toBe(result.blocks * BLOCK_ALL_LAYERS);
      expect(result.gbps).toBeGreaterThan(0);
    });
  }

  it("the demo's verifier notices a single wrong byte", () => {
    const layout = new KvLayout({ ...DEMO_SHAPE, layers: 2, blocks: 4 });
    const pool = new Uint8Array(layout.regionBytes);
    fillPool(layout, pool);
    expect(countWrongBytes(layout, pool, [1, 2], [1, 2])).toBe(0);
    expect(countWrongBytes(layout, pool, [1, 2], [2, 1])).toBeGreaterThan(0); // blocks swapped
    pool[layout.offsetOf(1, 1, 2) + 777] ^= 1;
    expect(countWrongBytes(layout, pool, [1, 2], [1, 2])).toBe(4); // one 32-bit word
  });

  it('rejects bad options with a clear message and a non-zero exit', () => {
    let status = 0;
    let stderr = '';
    try {
      execFileSync(process.execPath, [cli, 'demo', '--tp', '3:1'], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      status = (e as { status: number }).status;
      stderr = String((e as { stderr: string }).stderr);
    }
    expect(status).not.toBe(0);
    expect(stderr).toMatch(/--tp must be P:D/);
  });

  // KV pools in GPU memory: on this machine through the CUDA test double (the JSON says so).
  for (const tp of ['1:1', '2:1']) {
    it(`--memory vram moves and verifies every byte by path cuda_ipc (CUDA test double, TP ${tp})`, () => {
      const result = demoWith({ KVWIRE_CUDA_DRIVER: CUDA_DOUBLE }, '--memory', 'vram', '--tp', tp, '--requests', '6');
      expect(result).toMatchObject({ memory: 'vram', wrongBytes: 0, errors: 0, requests: 6, tp });
      expect(result.cudaTestDouble).toMatch(/test double/);
      expect(result.bytes).toBe(result.blocks * BLOCK_ALL_LAYERS);
    });
  }

  it('--memory vram without a CUDA driver fails at once with the reason', () => {
    let status = 0;
    let stderr = '';
    try {
      execFileSync(process.execPath, [cli, 'demo', '--memory', 'vram'], { encoding: 'utf8', stdio: 'pipe', env: { ...process.env, KVWIRE_CUDA_DRIVER: '/nonexistent/libcuda.so.1' } });
    } catch (e) {
      status = (e as { status: number }).status;
      stderr = String((e as { stderr: string }).stderr);
    }
    expect(status).not.toBe(0);
    expect(stderr).toMatch(/--memory vram: no CUDA \(CUDA driver \/nonexistent\/libcuda\.so\.1 \(KVWIRE_CUDA_DRIVER\) could not be loaded/);
  });
});
