// Tokenize .rlhf files with the real VS Code TextMate engine (vscode-textmate +
// vscode-oniguruma, installed in editors/vscode by `npm install`) and print, per file,
// every token as [line, text, scopes] in JSON, for tests/highlight/test_highlight_textmate.py.
// Usage: node tmgrammar_tokenize.js GRAMMAR_JSON FILE...
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const extensionRequire = createRequire(
  path.join(__dirname, "..", "..", "editors", "vscode", "package.json"));
const vsctm = extensionRequire("vscode-textmate");
const oniguruma = extensionRequire("vscode-oniguruma");

async function main() {
  const [grammarPath, ...files] = process.argv.slice(2);
  const wasm = fs.readFileSync(
    path.join(path.dirname(extensionRequire.resolve("vscode-oniguruma")), "onig.wasm"));
  await oniguruma.loadWASM(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength));
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (sources) => new oniguruma.OnigScanner(sources),
      createOnigString: (text) => new oniguruma.OnigString(text),
    }),
    loadGrammar: async () =>
      vsctm.parseRawGrammar(fs.readFileSync(grammarPath, "utf8"), grammarPath),
  });
  const grammar = await registry.loadGrammar("source.rlhf");
  const result = {};
  for (const file of files) {
    let state = vsctm.INITIAL;
    const tokens = [];
    fs.readFileSync(file, "utf8").split(/\r?\n/).forEach((line, index) => {
      const lineTokens = grammar.tokenizeLine(line, state);
      for (const t of lineTokens.tokens) {
        tokens.push([index + 1, line.slice(t.startIndex, t.endIndex), t.scopes]);
      }
      state = lineTokens.ruleStack;
    });
    result[file] = tokens;
  }
  process.stdout.write(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
