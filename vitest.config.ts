import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Each file starts its own UCX processes; two at a time suits a 2-core machine.
    maxWorkers: 2,
    pool: 'forks',
    // Most tests run agents without a secret on purpose; the warning that says so is tested on its own
    // (test/security.test.ts) and silenced elsewhere, in the test processes and the peers they start.
    execArgv: ['--disable-warning=KVWIRE_NO_SECRET'],
    env: { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --disable-warning=KVWIRE_NO_SECRET`.trim() },
  },
});
