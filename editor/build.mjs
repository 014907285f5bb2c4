// Bundles src.mjs into streamsvc/web/static/editor.js (one minified IIFE, no CDN).
// The banner names the sha256 of the inputs (package-lock.json, src.mjs, build.mjs), which
// tests/test_editor_bundle.py recomputes: a changed input without a rebuild fails it.
// Usage: node build.mjs [--out PATH]   (scripts/build-editor runs npm ci first)
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const outArg = process.argv.indexOf("--out");
const out = outArg > 0 ? process.argv[outArg + 1] : join(here, "..", "streamsvc", "web", "static", "editor.js");

const digest = createHash("sha256");
for (const name of ["package-lock.json", "src.mjs", "build.mjs"]) digest.update(readFileSync(join(here, name)));
const lock = JSON.parse(readFileSync(join(here, "package-lock.json"), "utf8"));
const versions = Object.entries(lock.packages)
  .filter(([path]) => path.startsWith("node_modules/@codemirror/"))
  .map(([path, meta]) => `${path.slice("node_modules/".length)}@${meta.version}`)
  .join(" ");

const banner = [
  `/* streamsvc playground editor; inputs sha256:${digest.digest("hex")} */`,
  `/* Built by editor/build.mjs (esbuild ${esbuild.version}) from: ${versions}. */`,
  "/* CodeMirror and Lezer: MIT License, Copyright (C) 2018-2021 by Marijn Haverbeke and others. */",
].join("\n");

await esbuild.build({
  entryPoints: [join(here, "src.mjs")],
  bundle: true,
  minify: true,
  format: "iife",
  globalName: "StreamsvcEditor",
  target: ["es2020"],
  legalComments: "none",
  charset: "utf8",
  banner: { js: banner },
  outfile: out,
  logLevel: "warning",
});
console.log(`editor: ${out}`);
