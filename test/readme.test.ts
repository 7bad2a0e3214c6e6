// The README's examples run: every ```ts block whose first line is `// example: <name>` is
// type-checked against lib/ (strict), run in its own process against the built library, and its
// output compared with the ```text block that follows it. An example that drifts from the API,
// does not compile, or prints something else, fails here.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import * as ts from 'typescript';
import { describe, expect, it } from 'vitest';

const readme = readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
const examples = [...readme.matchAll(/```ts\n\/\/ example: (\S+)\n([\s\S]*?)```\n```text\n([\s\S]*?)```/g)].map((m) => ({
  name: m[1],
  code: m[2],
  output: m[3],
}));
const root = path.join(__dirname, '..');
const dist = path.join(root, 'dist');

/** TypeScript's complaints about `file`, which imports 'kvwire' (resolved to lib/index.ts). */
function typeErrors(file: string): string[] {
  const program = ts.createProgram([file], {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ES2022,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    baseUrl: root,
    paths: { kvwire: ['lib/index.ts'] },
    typeRoots: [path.join(root, 'node_modules/@types')],
    types: ['node'],
  });
  return ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
}

describe('README examples', () => {
  it('are found (the pattern still matches the README)', () => {
    expect(examples.map((e) => e.name)).toEqual(expect.arrayContaining(['pool', 'early-stop']));
  });

  for (const ex of examples) {
    it(`'${ex.name}' runs and prints what the README says`, async () => {
      const dir = mkdtempSync(path.join(tmpdir(), 'kvwire-readme-'));
      writeFileSync(path.join(dir, `${ex.name}.ts`), ex.code);
      expect(typeErrors(path.join(dir, `${ex.name}.ts`))).toEqual([]);
      const js = ts.transpileModule(ex.code, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 } }).outputText;
      // kvwire is this checkout; top-level await runs inside an async function.
      const body = js.replace(/require\("kvwire"\)/g, JSON.stringify(dist).replace(/^/, 'require(') + ')');
      const file = path.join(dir, `${ex.name}.cjs`);
      writeFileSync(file, `(async () => {\n${body}\n})().catch((e) => { console.error(e); process.exit(1); });\n`);
      const { stdout } = await promisify(execFile)(process.execPath, [file], { timeout: 30_000 });
      expect(stdout.trim()).toBe(ex.output.trim());
    });
  }
});
