import assert from "node:assert/strict";
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerFile, writeLayer } from "../../test/support/layers.js";
import { type FetchLayer, type LayerDescriptor, LayerStore } from "./layer-store.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-layer-store-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A stand-in for the registry client: copies crafted blobs and counts fetches per digest. */
function registry(layers: LayerFile[]): { fetchLayer: FetchLayer; fetches: Map<string, number>; blobs: string[] } {
  const fetches = new Map<string, number>();
  const blobs: string[] = [];
  const fetchLayer: FetchLayer = async (layer, intoDir) => {
    fetches.set(layer.digest, (fetches.get(layer.digest) ?? 0) + 1);
    const found = layers.find((l) => l.descriptor.digest === layer.digest);
    if (!found) throw new Error(`no blob ${layer.digest}`);
    const path = join(intoDir, "blob");
    await copyFile(found.path, path);
    blobs.push(path);
    return path;
  };
  return { fetchLayer, fetches, blobs };
}

test("unpacks a layer once however many ask at once, then deletes its blob", async () => {
  const dir = join(root, "once");
  await mkdir(dir);
  const layer = await writeLayer(
    dir,
    [
      { name: "bin/sh", content: "#!", mode: 0o755 },
      { name: "etc/motd", content: "hello" },
    ],
    "zstd",
  );
  const { fetchLayer, fetches, blobs } = registry([layer]);
  const store = await LayerStore.open(join(dir, "store"), { fetchLayer });
  const trees = await Promise.all([1, 2, 3, 4].map(() => store.ensure(layer.descriptor)));
  assert.equal(fetches.get(layer.descriptor.digest), 1);
  assert.equal(new Set(trees).size, 1);
  assert.equal(await readFile(join(trees[0] ?? "", "etc/motd"), "utf8"), "hello");
  assert.equal(store.sizeOf(layer.descriptor.digest), 7);
  assert.equal(store.usedBytes, 7);
  await assert.rejects(stat(blobs[0] ?? ""), { code: "ENOENT" });
  assert.deepEqual(await readdir(join(dir, "store", "tmp")), []);
  assert.equal(await store.ensure(layer.descriptor), trees[0]);
  assert.equal(fetches.get(layer.descriptor.digest), 1);
});

test("a refused layer leaves nothing in the store or outside it", async () => {
  const dir = join(root, "evil");
  const sentinel = join(dir, "sentinel");
  await mkdir(sentinel, { recursive: true });
  const layer = await writeLayer(dir, [
    { name: "ok", content: "fine" },
    { name: "l", type: "symlink", linkname: sentinel },
    { name: "l/evil", content: "evil" },
  ]);
  const { fetchLayer } = registry([layer]);
  const store = await LayerStore.open(join(dir, "store"), { fetchLayer });
  await assert.rejects(
    store.ensure(layer.descriptor),
    new RegExp(`^StatusError: layer ${layer.descriptor.digest}: layer entry "l/evil": its parent "l" is a symlink$`),
  );
  assert.equal(store.has(layer.descriptor.digest), false);
  assert.deepEqual(await readdir(join(dir, "store", "tmp")), []);
  assert.deepEqual(await readdir(join(dir, "store", "layers")), []);
  assert.deepEqual(await readdir(sentinel), []);
});

test("a failed fetch leaves nothing and a later request tries again", async () => {
  const dir = join(root, "flaky");
  await mkdir(dir);
  const layer = await writeLayer(dir, [{ name: "f", content: "x" }], "gzip");
  let fail = true;
  const { fetchLayer: real } = registry([layer]);
  const fetchLayer: FetchLayer = async (descriptor, intoDir) => {
    if (fail) {
      await writeFile(join(intoDir, "partial"), "half");
      throw new Error("registry unavailable");
    }
    return real(descriptor, intoDir);
  };
  const store = await LayerStore.open(join(dir, "store"), { fetchLayer });
  await assert.rejects(store.ensure(layer.descriptor), /registry unavailable/);
  assert.deepEqual(await readdir(join(dir, "store", "tmp")), []);
  fail = false;
  assert.ok(await store.ensure(layer.descriptor));
});

test("reuses what is on disk after a restart and drops half-done work", async () => {
  const dir = join(root, "restart");
  await mkdir(dir);
  const a = await writeLayer(dir, [{ name: "a", content: "aaaa" }]);
  const b = await writeLayer(dir, [{ name: "b", content: "bb" }]);
  const { fetchLayer, fetches } = registry([a, b]);
  const first = await LayerStore.open(join(dir, "store"), { fetchLayer });
  await first.ensure(a.descriptor);
  await first.ensure(b.descriptor);
  first.touch(a.descriptor.digest);
  // What a crash could leave: an unpack in progress, and a layer directory no commit produced.
  await mkdir(join(dir, "store", "tmp", "half", "tree"), { recursive: true });
  const stray: LayerDescriptor = { ...a.descriptor, digest: `sha256:${"f".repeat(64)}` };
  await mkdir(join(first.treeOf(stray.digest)), { recursive: true });
  const second = await LayerStore.open(join(dir, "store"), { fetchLayer });
  assert.deepEqual(
    second
      .entries()
      .map(([digest, size]) => [digest, size])
      .sort(),
    [
      [a.descriptor.digest, 4],
      [b.descriptor.digest, 2],
    ].sort(),
  );
  assert.equal(second.usedBytes, 6);
  assert.equal(await readFile(join(await second.ensure(a.descriptor), "a"), "utf8"), "aaaa");
  assert.equal(fetches.get(a.descriptor.digest), 1);
  assert.deepEqual(await readdir(join(dir, "store", "tmp")), []);
  assert.equal(second.has(stray.digest), false);
  await assert.rejects(stat(join(first.treeOf(stray.digest), "..")), { code: "ENOENT" });
});

test("refuses digests it cannot use as a directory name", async () => {
  const store = await LayerStore.open(join(root, "digests"), { fetchLayer: () => assert.fail("fetched") });
  for (const digest of ["sha256:../../etc", "md5:abc", `sha256:${"A".repeat(64)}`]) {
    await assert.rejects(
      store.ensure({ digest, mediaType: "application/vnd.oci.image.layer.v1.tar", size: 1 }),
      /not supported/,
    );
  }
});

test("the store is root's only, and a layer an older version unpacked (modes untamed) is unpacked again", async () => {
  const dir = join(root, "older");
  await mkdir(dir, { mode: 0o755 });
  const layer = await writeLayer(dir, [{ name: "bin/su", content: "#!", mode: 0o4755 }], "gzip");
  const { fetchLayer, fetches } = registry([layer]);
  const store = await LayerStore.open(join(dir, "store"), { fetchLayer });
  assert.equal((await stat(join(dir, "store"))).mode & 0o777, 0o700);
  const tree = await store.ensure(layer.descriptor);
  assert.equal((await stat(join(tree, "bin/su"))).mode & 0o7777, 0o755);
  // What an older Berth wrote: the same record without its format, over a tree that kept the setuid bit.
  const record = join(tree, "..", "layer.json");
  const { format: _format, ...older } = JSON.parse(await readFile(record, "utf8")) as Record<string, unknown>;
  await writeFile(record, JSON.stringify(older));
  const reopened = await LayerStore.open(join(dir, "store"), { fetchLayer });
  assert.equal(reopened.has(layer.descriptor.digest), false);
  await reopened.ensure(layer.descriptor);
  assert.equal(fetches.get(layer.descriptor.digest), 2);
});
