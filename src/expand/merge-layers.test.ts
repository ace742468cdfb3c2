import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerEntry, writeLayer } from "../../test/support/layers.js";
import type { DiskBlobStore } from "../cas/disk-blob-store.js";
import type { Digest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { layerToTree } from "./layer-to-tree.js";
import { mergeLayerTrees } from "./merge-layers.js";
import { type CountingBlobStore, openTestCas } from "./test-cas.js";
import { listTree, missingBlobsOfTree, type TreeEntry } from "./tree-listing.js";

let root: string;
let cas: CountingBlobStore;
let disk: DiskBlobStore;
let counter = 0;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-merge-"));
  ({ cas, disk } = await openTestCas(root));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

async function layer(entries: LayerEntry[]): Promise<Digest> {
  const base = join(root, `layer-${++counter}`);
  await mkdir(base);
  const blob = await writeLayer(base, entries, "gzip");
  return (await layerToTree(blob.path, blob.descriptor.mediaType, SHA256, cas)).root;
}

/** The merged image as path → entry, after checking every blob of it is stored. */
async function image(...layers: LayerEntry[][]): Promise<Map<string, TreeEntry>> {
  const trees = [];
  for (const entries of layers) trees.push(await layer(entries));
  const merged = await mergeLayerTrees(SHA256, cas, trees);
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, merged), []);
  return new Map((await listTree(SHA256, cas, merged)).map((e) => [e.path, e]));
}

function paths(entries: Map<string, TreeEntry>): string[] {
  return [...entries.keys()].sort();
}

const base: LayerEntry[] = [
  { name: "etc/", type: "directory" },
  { name: "etc/motd", content: "bottom" },
  { name: "etc/keep", content: "keep" },
  { name: "opt/", type: "directory", mode: 0o700 },
  { name: "opt/a/x", content: "x" },
  { name: "opt/a/y", content: "y" },
  { name: "opt/b", content: "b" },
  { name: "bin", type: "symlink", linkname: "usr/bin" },
];

test("a whiteout deletes a lower file or directory, never the same layer's entry", async () => {
  const merged = await image(base, [
    { name: "etc/.wh.motd", content: "" },
    { name: "opt/.wh.a", content: "" },
    { name: ".wh.bin", content: "" },
    { name: "bin", content: "a file of this layer" },
    { name: "etc/.wh.keep", content: "" },
    { name: "etc/keep", content: "kept by its own layer" },
  ]);
  assert.deepEqual(paths(merged), ["bin", "etc", "etc/keep", "opt", "opt/b"]);
  assert.equal(merged.get("bin")?.kind, "file");
  assert.equal(merged.get("etc/keep")?.digest?.sizeBytes, "kept by its own layer".length);
});

test("an opaque directory hides everything below it but keeps its own entries", async () => {
  const merged = await image(base, [
    { name: "opt/.wh..wh..opq", content: "" },
    { name: "opt/new", content: "new" },
  ]);
  assert.deepEqual(paths(merged), ["bin", "etc", "etc/keep", "etc/motd", "opt", "opt/new"]);
});

test("a directory replaces a file and a file replaces a directory across layers", async () => {
  const merged = await image(
    base,
    [
      { name: "opt/a", content: "now a file" },
      { name: "etc/motd/", type: "directory" },
      { name: "etc/motd/inside", content: "i" },
    ],
    [{ name: "opt/a/again", content: "a directory again, with nothing of the first" }],
  );
  assert.deepEqual(paths(merged), [
    "bin",
    "etc",
    "etc/keep",
    "etc/motd",
    "etc/motd/inside",
    "opt",
    "opt/a",
    "opt/a/again",
    "opt/b",
  ]);
  assert.equal(merged.get("etc/motd")?.kind, "directory");
});

test("directories merge, the upper one's mode winning; whiteouts never reach the image", async () => {
  const merged = await image(
    [{ name: "solo/.wh.nothing-below", content: "" }, ...base],
    [
      { name: "opt/", type: "directory", mode: 0o751 },
      { name: "opt/a/z", content: "z" },
    ],
  );
  assert.deepEqual(paths(merged), [
    "bin",
    "etc",
    "etc/keep",
    "etc/motd",
    "opt",
    "opt/a",
    "opt/a/x",
    "opt/a/y",
    "opt/a/z",
    "opt/b",
    "solo",
  ]);
  assert.equal(merged.get("opt")?.mode, 0o751);
});

test("unchanged lower subtrees keep their digests, and a second merge writes nothing", async () => {
  const lower = await layer(base);
  const upper = await layer([{ name: "etc/new", content: "new" }]);
  const merged = await mergeLayerTrees(SHA256, cas, [lower, upper]);
  const before = new Map((await listTree(SHA256, cas, lower)).map((e) => [e.path, e.digest]));
  const after = new Map((await listTree(SHA256, cas, merged)).map((e) => [e.path, e.digest]));
  assert.deepEqual(after.get("opt"), before.get("opt"));
  assert.deepEqual(after.get("opt/a"), before.get("opt/a"));
  assert.notDeepEqual(after.get("etc"), before.get("etc"));
  assert.deepEqual(await mergeLayerTrees(SHA256, cas, [lower]), lower, "a layer without whiteouts is its own image");
  const writes = cas.writes;
  assert.deepEqual(await mergeLayerTrees(SHA256, cas, [lower, upper]), merged);
  assert.equal(cas.writes, writes);
});

test("no layers make an empty image", async () => {
  const merged = await mergeLayerTrees(SHA256, cas, []);
  assert.deepEqual(await listTree(SHA256, cas, merged), []);
});

test("a layer tree missing from the CAS is NOT_FOUND naming the digest", async () => {
  const lower = await layer(base);
  const upper = await layer([{ name: "gone/deep/file", content: "a directory that will be deleted" }]);
  const gone = (await listTree(SHA256, cas, upper)).find((e) => e.path === "gone/deep")?.digest;
  assert.ok(gone);
  await disk.remove(gone);
  await assert.rejects(mergeLayerTrees(SHA256, cas, [lower, upper]), {
    code: 5,
    message: new RegExp(`${gone.hash}/${gone.sizeBytes} is not in the CAS`),
  });
  await disk.remove(upper);
  await assert.rejects(mergeLayerTrees(SHA256, cas, [upper, lower]), { code: 5, message: new RegExp(upper.hash) });
});
