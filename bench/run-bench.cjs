// What the scripts that run `kvwire bench` several times share: taking their own option out of the
// argument list, running the bench with --json in a child and reading its result.
'use strict';
const { spawn } = require('node:child_process');
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

module.exports = { root, takeOption, runBenchJson, formatSize };
