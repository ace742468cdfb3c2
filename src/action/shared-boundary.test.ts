import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

/**
 * The worker runs on other machines than the server and must not pull in the
 * server's execution pipeline; expand mode's server side must not depend on
 * the Execute front end it serves. What both sides read lives in src/action/
 * (platform properties, output paths, the action's environment) and
 * src/registry/ (registry statuses). Runners know nothing of the worker.
 * The sources are read, not the compiled files, so type-only imports count too.
 */
const SRC = resolve(dirname(fileURLToPath(import.meta.url)), "../../../src");

const FORBIDDEN: Record<string, readonly string[]> = {
  worker: ["execution", "scheduler", "api", "farm", "ac"],
  expand: ["execution", "scheduler", "api", "farm"],
  // Runners run commands; what an action is and where its inputs come from are the worker's.
  runner: ["execution", "scheduler", "api", "farm", "ac", "worker"],
};

/** Every module specifier in a file: `from "…"`, `import "…"` and `import("…")`. */
const SPECIFIER = /(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"']+)["']/g;

function sourceFiles(folder: string): string[] {
  return readdirSync(join(SRC, folder), { recursive: true, encoding: "utf8" })
    .filter((name) => name.endsWith(".ts"))
    .map((name) => join(SRC, folder, name));
}

/** The src/ folders outside `folder` that `file` imports from, as "file → specifier". */
function crossings(file: string, forbidden: readonly string[]): string[] {
  const found: string[] = [];
  for (const match of readFileSync(file, "utf8").matchAll(SPECIFIER)) {
    const specifier = match[1] as string;
    if (!specifier.startsWith(".")) continue;
    const target = relative(SRC, resolve(dirname(file), specifier));
    const top = target.split(sep)[0] as string;
    if (forbidden.includes(top)) found.push(`${relative(SRC, file)} imports ${specifier}`);
  }
  return found;
}

for (const [folder, forbidden] of Object.entries(FORBIDDEN)) {
  test(`src/${folder} imports nothing from ${forbidden.map((f) => `src/${f}`).join(", ")}`, () => {
    const files = sourceFiles(folder);
    // An empty listing would make the check pass without checking anything.
    assert.ok(files.length > 3, `found only ${files.length} files under src/${folder}`);
    assert.deepEqual(
      files.flatMap((file) => crossings(file, forbidden)),
      [],
    );
  });
}

test("the check sees an import across the boundary, multi-line and type-only ones too", () => {
  // The same matcher as above, on text shaped as the imports it must catch.
  const text = [
    'import type { Property } from "../scheduler/platform.js";',
    "import {\n  a,\n  b,\n} from '../execution/executor.js';",
    'const m = await import("../api/server.js");',
    'import "../farm/farm.js";',
  ].join("\n");
  const specifiers = [...text.matchAll(SPECIFIER)].map((m) => m[1]);
  assert.deepEqual(specifiers, [
    "../scheduler/platform.js",
    "../execution/executor.js",
    "../api/server.js",
    "../farm/farm.js",
  ]);
});
