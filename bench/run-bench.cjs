// What the scripts that run `kvwire bench` several times share: taking their own option out of the
// argument list, running the bench with --json in a child and reading its result.
'use strict';
const { execFileSync, spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.join(__dirname, '..');

/** Removes `--name VALUE` from `args`; returns the remaining arguments and VALUE (undefined if absent). */
function takeOption(args, name) {
  const at = args.indexOf(name);
  if (at < 0) return { args, value: undefined };
  return { args: [...args.slice(0, at), ...args.slice(at + 2)], value: args[at + 1] ?? '' };
}

// The bench's JSON object, from a stdout that UCX may also have written log lines to.
function parseJson(out) {
  const start = out.search(/^\{/m);
  const end = out.lastIndexOf('}');
  if (start < 0 || end < start) throw new Error(`no JSON in the bench's output: ${out.slice(0, 200)}`);
  return JSON.parse(out.slice(start, end + 1));
}

/** Runs `kvwire bench --json ...args` (progress on stderr, announced as `label`) and resolves its result. */
function runBenchJson(label, args, env = {}) {
  return new Promise((resolve, reject) => {
    process.stderr.write(`== ${label}\n`);
    const child = spawn(process.execPath, [path.join(root, 'dist/cli/index.js'), 'bench', '--json', ...args], {
      env: { ...process.env, ...env, UCX_WARN_UNUSED_ENV_VARS: 'n' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.on('exit', (code) => {
      try {
        if (code !== 0) throw new Error(`kvwire bench (${label}) exited ${code}`);
        resolve(parseJson(out));
      } catch (e) {
        reject(e);
      }
    });
  });
}

const formatSize = (n) => (n >= 1 << 20 ? `${n / (1 << 20)} MiB` : n >= 1024 ? `${n / 1024} KiB` : `${n} B`);

/**
 * The environment that makes `kvwire bench` use one UCX build: '1.13' (Debian's, build/) or '1.22'
 * (PyPI's with CUDA transports, build-ucx122/ from .ci/ucx-smoke.sh, with that UCX's ucx_perftest);
 * { skipped: why } where it is not built.
 */
function buildEnv(version) {
  if (version === '1.13') {
    const addon = path.join(root, 'build/Release/kvwire.node');
    return fs.existsSync(addon) ? { env: { KVWIRE_ADDON: addon } } : { skipped: `${addon} not built (npm run build)` };
  }
  const addon = path.join(root, 'build-ucx122/Release/kvwire.node');
  if (!fs.existsSync(addon)) return { skipped: `${addon} not built (bash .ci/ucx-smoke.sh builds it)` };
  let ucx;
  try {
    ucx = execFileSync('bash', [path.join(root, '.ci/fetch-ucx122.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch (e) {
    return { skipped: `PyPI's UCX 1.22 could not be fetched (.ci/fetch-ucx122.sh: ${String(e.stderr || e.message).trim().split('\n').pop()})` };
  }
  return {
    env: {
      KVWIRE_ADDON: addon,
      // ucx_perftest of the same UCX as the addon, for the baseline column.
      PATH: `${path.join(ucx, 'bin')}:${process.env.PATH}`,
      LD_LIBRARY_PATH: [path.join(ucx, 'lib'), process.env.LD_LIBRARY_PATH].filter(Boolean).join(':'),
    },
  };
}

/** A neighbour that spins one core until killed (a separate process, as on a shared host). */
function spinner() {
  return spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' });
}

/** Median (the mean of the middle two for an even count). */
const median = (v) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

module.exports = { root, takeOption, runBenchJson, formatSize, spinner, median, buildEnv };
