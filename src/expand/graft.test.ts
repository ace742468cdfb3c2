import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerEntry, writeLayer } from "../../test/support/layers.js";
import type { Digest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { StatusError } from "../status/status.js";
import { graftInputRoot } from "./graft.js";
import { layerToTree } from "./layer-to-tree.js";
import { type CountingBlobStore, openTestCas } from "./test-cas.js";
import { listTree, missingBlobsOfTree, type TreeEntry } from "./tree-listing.js";

let root: string;
let cas: CountingBlobStore;
let counter = 0;
const EXECROOT = "/run/berth/execroot";

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-graft-"));
  ({ cas } = await openTestCas(root));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A tree in the CAS holding `entries` (made through a layer: the simplest way to build one). */
async function tree(entries: LayerEntry[]): Promise<Digest> {
  const base = join(root, `tree-${++counter}`);
  await mkdir(base);
  const blob = await writeLayer(base, entries);
  return (await layerToTree(blob.path, blob.descriptor.mediaType, SHA256, cas)).root;
}

async function listing(digest: Digest): Promise<Map<string, TreeEntry>> {
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, digest), []);
  return new Map((await listTree(SHA256, cas, digest)).map((e) => [e.path, e]));
}

const imageEntries: LayerEntry[] = [
  { name: "bin/sh", content: "a shell", mode: 0o755 },
  { name: "run/", type: "directory", mode: 0o710 },
  { name: "run/lock/", type: "directory", mode: 0o1777 },
];
const inputEntries: LayerEntry[] = [
  { name: "src/main.c", content: "int main() {}" },
  { name: "BUILD", content: "cc_binary()" },
];

test("grafts the input root at its path, creating the missing directories", async () => {
  const image = await tree(imageEntries);
  const input = await tree(inputEntries);
  const { base, merged } = await graftInputRoot(SHA256, cas, image, input, EXECROOT);
  const baseEntries = await listing(base);
  assert.deepEqual([...baseEntries.keys()].sort(), [
    "bin",
    "bin/sh",
    "run",
    "run/berth",
    "run/berth/execroot",
    "run/lock",
  ]);
  assert.equal(baseEntries.get("run")?.mode, 0o710, "an existing ancestor keeps its mode");
  assert.equal(baseEntries.get("run/berth")?.mode, 0o755);
  assert.equal(baseEntries.get("run/berth/execroot")?.mode, 0o755);
  const mergedEntries = await listing(merged);
  const inputListing = await listing(input);
  for (const [path, entry] of inputListing) {
    assert.deepEqual(mergedEntries.get(`run/berth/execroot/${path}`), { ...entry, path: `run/berth/execroot/${path}` });
  }
  assert.deepEqual(mergedEntries.get("run/berth/execroot")?.digest, input);
  assert.deepEqual(mergedEntries.get("bin/sh"), baseEntries.get("bin/sh"));
  assert.deepEqual(mergedEntries.get("run/lock"), baseEntries.get("run/lock"));
});

test("keeps an empty directory the image already has at the path", async () => {
  const image = await tree([...imageEntries, { name: "run/berth/execroot/", type: "directory", mode: 0o700 }]);
  const input = await tree(inputEntries);
  const { base, merged } = await graftInputRoot(SHA256, cas, image, input, `${EXECROOT}/`);
  assert.deepEqual(base, image);
  assert.equal((await listing(merged)).get("run/berth/execroot/src/main.c")?.kind, "file");
  const fromRoot = await graftInputRoot(SHA256, cas, await tree([{ name: "a", content: "a" }]), input, "/x");
  assert.deepEqual((await listing(fromRoot.merged)).get("x")?.digest, input);
});

const clashes: [string, LayerEntry[], string][] = [
  ["a file at an ancestor", [{ name: "run/berth", content: "" }], `"/run/berth" exists in the image as a file`],
  [
    "a symlink at an ancestor",
    [{ name: "run", type: "symlink", linkname: "/var/run" }],
    `"/run" exists in the image as a symlink to "/var/run"`,
  ],
  [
    "a symlink at the path",
    [{ name: "run/berth/execroot", type: "symlink", linkname: "/tmp" }],
    `"/run/berth/execroot" exists in the image as a symlink to "/tmp"`,
  ],
  [
    "a non-empty directory",
    [{ name: "run/berth/execroot/x", content: "" }],
    `"/run/berth/execroot/x" exists in the image`,
  ],
];

for (const [what, entries, message] of clashes) {
  test(`refuses ${what} where the input root goes`, async () => {
    const image = await tree([...imageEntries, ...entries]);
    const input = await tree(inputEntries);
    const err = await graftInputRoot(SHA256, cas, image, input, EXECROOT).then(
      () => assert.fail("grafted"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof StatusError);
    assert.equal(err.code, 3);
    assert.equal(
      err.message,
      `container image: ${message}, where the input root goes; choose another images.inputRootPath`,
    );
  });
}

test("refuses paths that are not absolute plain names", async () => {
  const image = await tree(imageEntries);
  for (const path of ["run/berth", "/", "/run/../etc", "/run/./x", ""]) {
    await assert.rejects(graftInputRoot(SHA256, cas, image, image, path), {
      code: 3,
      message: /^images\.inputRootPath: /,
    });
  }
});
