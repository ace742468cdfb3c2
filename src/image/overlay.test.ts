import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerEntry, writeLayer } from "../../test/support/layers.js";
import { unpackLayer } from "./layer-unpack.js";
import { overlayMountArgs, runInOverlay } from "./overlay.js";
import { WhiteoutMaker } from "./whiteout.js";

let root: string;
let whiteouts: WhiteoutMaker;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-overlay-"));
  whiteouts = new WhiteoutMaker(join(root, "whiteout"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

async function layer(dir: string, entries: LayerEntry[]): Promise<string> {
  const blob = await writeLayer(root, entries, "gzip");
  await mkdir(join(dir, ".."), { recursive: true });
  await unpackLayer(blob.path, blob.descriptor.mediaType, dir, { whiteouts });
  return dir;
}

/** Every path under `dir` with its kind and content, to show a directory did not change. */
async function snapshot(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await readdir(join(dir, prefix))).sort()) {
    const path = join(prefix, name);
    const info = await lstat(join(dir, path));
    if (info.isDirectory()) out.push(`${path}/ ${info.mode.toString(8)}`, ...(await snapshot(dir, path)));
    else if (info.isFile()) out.push(`${path} ${await readFile(join(dir, path), "utf8")}`);
    else out.push(`${path} rdev=${info.rdev}`);
  }
  return out;
}

async function actionDirs(name: string) {
  const base = join(root, name);
  for (const dir of ["upper", "work", "merged"]) await mkdir(join(base, dir), { recursive: true });
  return { upper: join(base, "upper"), work: join(base, "work"), merged: join(base, "merged"), links: join(base, "l") };
}

test("whiteouts and opaque directories hide lower content; writes land in the upper layer only", async () => {
  const bottom = await layer(join(root, "layers/bottom"), [
    { name: "gone", content: "bottom" },
    { name: "kept", content: "bottom" },
    { name: "opaque/old", content: "bottom" },
    { name: "merged/old", content: "bottom" },
    { name: "tree/deep/file", content: "bottom" },
  ]);
  const top = await layer(join(root, "layers/top"), [
    { name: ".wh.gone", content: "" },
    { name: "opaque/.wh..wh..opq", content: "" },
    { name: "opaque/new", content: "top" },
    { name: "merged/new", content: "top" },
    { name: ".wh.tree", content: "" },
  ]);
  const before = [await snapshot(bottom), await snapshot(top)];
  const dirs = await actionDirs("two");
  const args = overlayMountArgs([bottom, top], dirs.upper, dirs.work, dirs.links);
  assert.equal(args.options, `lowerdir=${top}:${bottom},upperdir=${dirs.upper},workdir=${dirs.work},volatile`);
  const script = [
    "cd $0",
    "find . -mindepth 1 | sort",
    "echo ---",
    "echo written > written && echo changed > kept && rm merged/old && cat kept opaque/new",
  ].join(" && ");
  const { stdout } = await runInOverlay(args, dirs.merged, ["sh", "-c", script, dirs.merged]);
  const [listing, output] = stdout.split("---\n");
  assert.deepEqual(listing?.trim().split("\n"), [
    "./kept",
    "./merged",
    "./merged/new",
    "./merged/old",
    "./opaque",
    "./opaque/new",
  ]);
  assert.equal(output, "changed\ntop");
  assert.deepEqual([await snapshot(bottom), await snapshot(top)], before, "the layers are unchanged");
  const upper = await snapshot(dirs.upper);
  assert.deepEqual(
    upper.filter((line) => !line.endsWith("/ 40755")),
    ["kept changed\n", "merged/old rdev=0", "written written\n"],
  );
  assert.deepEqual(await readdir(dirs.merged), [], "the mount stayed in its namespace");
});

test("mounts images of many layers with long paths through short links", async () => {
  const deep = join(root, "a-rather-long-directory-name-for-a-data-dir".repeat(2), "layers", "sha256");
  const layers: string[] = [];
  for (let i = 0; i < 60; i++) {
    const hex = i.toString(16).padStart(64, "0");
    layers.push(await layer(join(deep, hex, "tree"), [{ name: "which", content: `${i}` }, { name: `only-${i}` }]));
  }
  const dirs = await actionDirs("many");
  const args = overlayMountArgs(layers, dirs.upper, dirs.work, dirs.links);
  assert.equal(args.links.length, 60);
  assert.equal(args.cwd, dirs.links);
  assert.ok(args.options.length < 4096);
  const { stdout } = await runInOverlay(args, dirs.merged, [
    "sh",
    "-c",
    'cat "$0/which" && echo && ls "$0" | wc -l',
    dirs.merged,
  ]);
  assert.equal(stdout, "59\n61\n");
});

test("lists lower layers top first and each only once", () => {
  const args = overlayMountArgs(["/l/a", "/l/b", "/l/a", "/l/c"], "/u", "/w", "/links");
  assert.equal(args.options, "lowerdir=/l/c:/l/a:/l/b,upperdir=/u,workdir=/w,volatile");
  assert.deepEqual(args.links, []);
  assert.throws(() => overlayMountArgs(["/l/a,b"], "/u", "/w", "/links"), /without , : or/);
  assert.throws(() => overlayMountArgs([], "/u", "/w", "/links"), /at least one lower layer/);
});
