// The main job runs in the suite with small settings and must report zero wrong blocks.
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

const cli = path.join(__dirname, '..', 'dist', 'cli', 'index.js');

describe('kvwire demo', () => {
  for (const transport of ['shm', 'tcp']) {
    it(`moves and verifies every block (${transport})`, () => {
      const out = execFileSync(process.execPath, [cli, 'demo', '--transport', transport, '--requests', '20', '--json'], {
        encoding: 'utf8',
        timeout: 60_000,
      });
      const result = JSON.parse(out.trim().split('\n').pop()!);
      expect(result.errors).toBe(0);
      expect(result.requests).toBe(20);
      expect(result.blocks).toBeGreaterThanOrEqual(80);
      expect(result.bytes).toBe(result.blocks * 65536);
      expect(result.gbps).toBeGreaterThan(0);
    });
  }
});
