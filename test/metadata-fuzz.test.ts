// Metadata from the wire is the first thing a peer controls. Thousands of mutated blobs (truncated,
// extended, shuffled, bytes set), unsigned and signed, are loaded into real agents in a child
// process, so a crash inside UCX's address or key parsers is counted instead of killing the test.
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const MUTATIONS = 12_000;

describe('metadata fuzz through loadPeer', () => {
  for (const tls of ['shm,self', 'tcp']) {
    it(`${MUTATIONS} unsigned and ${MUTATIONS} signed mutations (${tls}): no crash, no altered blob loads, only ERR_INVALID_PARAM / ERR_NOT_ALLOWED`, async () => {
      const { stdout } = await promisify(execFile)(process.execPath, [path.join(__dirname, 'fixtures/metadata-fuzz.cjs'), String(MUTATIONS), tls === 'tcp' ? '7' : '3'], {
        env: { ...process.env, FUZZ_TLS: tls },
        timeout: 120_000,
      }); // a crash rejects here with the signal that killed it
      const { codes } = JSON.parse(stdout.trim().split('\n').pop()!);
      for (const [kind, allowed] of [['unsigned', 'ERR_INVALID_PARAM'], ['signed', 'ERR_NOT_ALLOWED']] as const) {
        const seen = codes[kind] as Record<string, number>;
        const total = Object.values(seen).reduce((a, b) => a + b, 0);
        expect(total).toBe(MUTATIONS);
        // OK only where the mutation left the blob unchanged (e.g. a range moved onto itself);
        // SEALED_MAGIC: a plain blob mutated to start like a sealed one, refused as sealed (ERR_NOT_ALLOWED).
        expect(Object.keys(seen).filter((c) => c !== allowed && c !== 'OK' && c !== 'SEALED_MAGIC'), JSON.stringify(seen)).toEqual([]);
        expect(seen[allowed]).toBeGreaterThan(MUTATIONS * 0.95);
      }
    });
  }
});
