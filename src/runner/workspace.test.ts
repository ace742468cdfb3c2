import assert from "node:assert/strict";
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, test } from "node:test";
import { cleanPreservedWorkspace, clearWayForTree, emptyWorkspace } from "./workspace.js";

let dir: string;
let root: string;
/** Stands for the host's files: the workspace's previous action pointed links at it. */
let host: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "berth-workspace-"));
  root = join(dir, "workspace");
  host = join(dir, "host");
  mkdirSync(root);
  mkdirSync(join(host, "etc"), { recursive: true });
  writeFileSync(join(host, "etc", "passwd"), "root:x:0:0\n");
  writeFileSync(join(host, "secret"), "keep me\n");
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** Files and links below `at`, relative, sorted; links are not entered. */
function tree(at: string, prefix = ""): string[] {
  const out: string[] = [];
  for (const name of readdirSync(at).sort()) {
    const path = join(at, name);
    const rel = prefix + name;
    if (lstatSync(path).isDirectory()) out.push(`${rel}/`, ...tree(path, `${rel}/`));
    else out.push(rel);
  }
  return out;
}

function write(path: string, text = "x"): void {
  mkdirSync(join(root, path, ".."), { recursive: true });
  writeFileSync(join(root, path), text);
}

const hostIntact = () => assert.deepEqual(tree(host), ["etc/", "etc/passwd", "secret"]);

test("emptyWorkspace removes everything inside, links themselves and not what they lead to, and keeps the directory", () => {
  write("a/b/c.txt");
  symlinkSync(join(host, "etc"), join(root, "etc"));
  symlinkSync(join(host, "secret"), join(root, "a", "secret"));
  emptyWorkspace(root);
  assert.deepEqual(readdirSync(root), []);
  hostIntact();
});

test("a preserved workspace loses the previous outputs and the inputs matching clean-workspace-inputs, nothing else", () => {
  write("src/main.c");
  write("src/gen.c");
  write("build/main.o");
  write("build/cache/state");
  write("logs/run.log");
  write(".hidden/x.log");
  cleanPreservedWorkspace(
    root,
    { outputs: ["build/main.o", "logs"], inputs: ["src/main.c", "src/gen.c", ".hidden/x.log"] },
    ["src/gen.*", "**/*.log"],
  );
  assert.deepEqual(tree(root), [".hidden/", "build/", "build/cache/", "build/cache/state", "src/", "src/main.c"]);
});

test("outputs reached through a link the previous action planted are not removed where the link leads", () => {
  // The previous action replaced its output directory by a link to the host's /etc.
  symlinkSync(join(host, "etc"), join(root, "out"));
  symlinkSync(join(host, "secret"), join(root, "secret-link"));
  cleanPreservedWorkspace(
    root,
    { outputs: ["out/passwd", "secret-link", "../host/secret", "/etc/passwd"], inputs: ["out/passwd"] },
    ["**"],
  );
  hostIntact();
  // The link named as an output is itself removed (it is the output), the one on the way is not entered.
  assert.deepEqual(tree(root), ["out"]);
});

test("laying a tree over a preserved workspace clears the way: files, links and non-directories where it needs them", () => {
  write("keep/state.db", "mine");
  write("a/file-becomes-dir"); // the new tree has a directory here
  mkdirSync(join(root, "b", "dir-becomes-file"), { recursive: true }); // and a file here
  write("b/dir-becomes-file/inner");
  symlinkSync(join(host, "etc"), join(root, "c")); // a link where the tree has a directory
  write("d/input.txt", "old");
  clearWayForTree(root, {
    directories: [
      { path: "" },
      { path: "a" },
      { path: "a/file-becomes-dir" },
      { path: "b" },
      { path: "c" },
      { path: "d" },
    ],
    files: [{ path: "b/dir-becomes-file" }, { path: "c/passwd" }, { path: "d/input.txt" }],
    symlinks: [{ path: "d/link" }],
  });
  hostIntact();
  assert.ok(!existsSync(join(root, "c")), "the planted link is gone, not entered");
  assert.deepEqual(tree(root), ["a/", "b/", "d/", "keep/", "keep/state.db"]);
});
