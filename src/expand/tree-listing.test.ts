import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { writeLayer } from "../../test/support/layers.js";
import type { DiskBlobStore } from "../cas/disk-blob-store.js";
import { SHA256 } from "../digest/functions.js";
import { layerToTree } from "./layer-to-tree.js";
import { type CountingBlobStore, openTestCas } from "./test-cas.js";
import { listTree, missingBlobsOfTree } from "./tree-listing.js";

let root: string;
let cas: CountingBlobStore;
let disk: DiskBlobStore;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-listing-"));
  ({ cas, disk } = await openTestCas(root));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

test("missingBlobsOfTree names deleted file and directory blobs, and does not descend into a missing directory", async () => {
  const dir = join(root, "layer");
  await mkdir(dir);
  const layer = await writeLayer(dir, [
    { name: "a/one", content: "one" },
    { name: "a/same", content: "shared" },
    { name: "b/two", content: "two" },
    { name: "b/same", content: "shared" },
    { name: "b/deeper/three", content: "three" },
  ]);
  const { root: tree } = await layerToTree(layer.path, layer.descriptor.mediaType, SHA256, cas);
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, tree), []);
  const entries = new Map((await listTree(SHA256, cas, tree)).map((e) => [e.path, e]));
  const one = entries.get("a/one")?.digest;
  const shared = entries.get("a/same")?.digest;
  const b = entries.get("b")?.digest;
  assert.ok(one && shared && b);
  await disk.remove(one);
  await disk.remove(shared);
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, tree), [one, shared], "a blob used twice is named once");
  await disk.remove(b);
  // Below b, "two" and "three" are stored but cannot be known: only b itself is named.
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, tree), [b, one, shared]);
  await assert.rejects(listTree(SHA256, cas, tree), { code: 5 });
  await disk.remove(tree);
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, tree), [tree]);
});
