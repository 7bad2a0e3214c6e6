// The packages `vitest` needs at run time (dependencies, and optional ones that are installed),
// as paths under node_modules: what the GPU bundle carries so the suite runs with nothing installed.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const root = path.join(__dirname, '..', '..', 'node_modules');
const seen = new Set();
function visit(name) {
  if (seen.has(name)) return;
  const dir = path.join(root, name);
  if (!fs.existsSync(path.join(dir, 'package.json'))) return; // optional and not installed here
  seen.add(name);
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
  for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies })) visit(dep);
}
for (const name of process.argv.slice(2)) visit(name);
console.log([...seen].sort().map((n) => `node_modules/${n}`).join('\n'));
