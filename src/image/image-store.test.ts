import assert from "node:assert/strict";
import { copyFile, mkdir, mkdtemp, readFile, rm, utimes } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerFile, writeLayer } from "../../test/support/layers.js";
import { type Image, ImageStore } from "./image-store.js";
import type { FetchLayer } from "./layer-store.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-image-store-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Layers of `size` bytes each, a registry serving them, and how often it did. */
async function fixture(name: string, sizes: number[]) {
  const dir = join(root, name);
  await mkdir(dir);
  const layers: LayerFile[] = [];
  for (const [i, size] of sizes.entries()) {
    layers.push(await writeLayer(dir, [{ name: `layer-${i}`, content: String(i % 10).repeat(size) }], "gzip"));
  }
  const fetches: string[] = [];
  const fetchLayer: FetchLayer = async (layer, intoDir) => {
    fetches.push(layer.digest);
    const found = layers.find((l) => l.descriptor.digest === layer.digest);
    if (!found) throw new Error(`no blob ${layer.digest}`);
    await new Promise((resolve) => setTimeout(resolve, 5)); // let concurrent callers overlap
    await copyFile(found.path, join(intoDir, "blob"));
    return join(intoDir, "blob");
  };
  const image = (digit: string, ...indexes: number[]): Image => ({
    digest: `sha256:${digit.repeat(64)}`,
    layers: indexes.map((i) => layers[i]?.descriptor ?? assert.fail()),
    config: { env: ["PATH=/bin"], workingDir: "/src" },
  });
  return { dir, layers, fetches, fetchLayer, image, digestOf: (i: number) => layers[i]?.descriptor.digest };
}

test("concurrent acquires of one image unpack each layer once, bottom to top", async () => {
  const f = await fixture("concurrent", [10, 20, 30]);
  const store = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 1000 });
  const image = f.image("a", 0, 1, 2);
  const acquired = await Promise.all([1, 2, 3, 4, 5].map(() => store.acquire(image)));
  assert.equal(f.fetches.length, 3);
  const first = acquired[0] ?? assert.fail();
  assert.deepEqual(await Promise.all(first.layerDirs.map((dir, i) => readFile(join(dir, `layer-${i}`), "utf8"))), [
    "0".repeat(10),
    "1".repeat(20),
    "2".repeat(30),
  ]);
  assert.deepEqual(first.config, image.config);
  for (const a of acquired) assert.deepEqual(a.layerDirs, first.layerDirs);
  await Promise.all(acquired.map((a) => a.release()));
  assert.equal(store.isPresent(image), true);
  await (await store.acquire(image)).release();
  assert.equal(f.fetches.length, 3, "an image already present costs no fetch");
});

test("evicts least recently used layers no acquired image uses, sparing shared ones", async () => {
  const f = await fixture("evict", [100, 100, 100, 100]);
  const evicted: string[] = [];
  const store = await ImageStore.open(join(f.dir, "store"), {
    fetchLayer: f.fetchLayer,
    maxBytes: 300,
    onEvict: (digest) => evicted.push(digest),
  });
  const a = await store.acquire(f.image("a", 0, 1)); // pinned throughout
  const b = await store.acquire(f.image("b", 1, 2)); // shares layer 1 with a
  await b.release();
  assert.equal(store.usedBytes, 300);
  const c = await store.acquire(f.image("c", 3));
  // 400 bytes: layer 2 (b's own, unused) goes; layer 1 stays while a uses it.
  assert.deepEqual(evicted, [f.digestOf(2)]);
  assert.equal(store.usedBytes, 300);
  await a.release();
  await c.release();
  const b2 = await store.acquire(f.image("b", 1, 2));
  // Layer 2 is back; the least recently used unpinned layer (0) makes room.
  assert.deepEqual(evicted, [f.digestOf(2), f.digestOf(0)]);
  assert.equal(await readFile(join(b2.layerDirs[0] ?? "", "layer-1"), "utf8"), "1".repeat(100));
  await b2.release();
  await b2.release(); // idempotent
  assert.equal(store.usedBytes, 300);
});

test("never evicts a layer in use, even past the cap, and catches up on release", async () => {
  const f = await fixture("pinned", [100, 100, 100]);
  const store = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 200 });
  const a = await store.acquire(f.image("a", 0, 1));
  const b = await store.acquire(f.image("b", 2));
  assert.equal(store.usedBytes, 300, "both images run; the cap waits");
  for (const [i, dir] of [...a.layerDirs, ...b.layerDirs].entries()) {
    assert.equal(await readFile(join(dir, `layer-${i}`), "utf8"), String(i).repeat(100));
  }
  await a.release();
  assert.equal(store.usedBytes, 200, "released layers go, down to the cap");
  assert.equal(store.isPresent(f.image("a", 0)), false);
  assert.equal(store.isPresent(f.image("b", 1, 2)), true);
  await assert.rejects(store.acquire(f.image("c", 0, 1, 2)), {
    code: 9,
    message: /its layers hold more than 200 bytes of files \(images.storeMaxSizeBytes\)/,
  });
  await b.release();
});

test("reuses unpacked layers after a restart, in their last-use order", async () => {
  const f = await fixture("restart", [100, 100]);
  const first = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 1000 });
  await (await first.acquire(f.image("a", 0, 1))).release();
  const second = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 1000 });
  const again = await second.acquire(f.image("a", 0, 1));
  assert.equal(f.fetches.length, 2);
  assert.equal(await readFile(join(again.layerDirs[1] ?? "", "layer-1"), "utf8"), "1".repeat(100));
  await again.release();
  // The last use is kept in layer.json's mtime (to the minute): make layer 1 the older one.
  const old = new Date(Date.now() - 3_600_000);
  await utimes(join(again.layerDirs[1] ?? "", "..", "layer.json"), old, old);
  // Reopened under a smaller cap, the store evicts at once, least recently used first.
  const third = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 150 });
  assert.equal(third.usedBytes, 100);
  assert.equal(third.isPresent(f.image("a", 0)), true);
  assert.equal(third.isPresent(f.image("a", 1)), false);
});

test("an image over its caps stops while its layers are read; another image sharing a layer is not refused with it", async () => {
  const f = await fixture("caps", [100, 100, 150]);
  const imageLimits = { maxLayerBytes: 1000, maxLayerEntries: 10, maxImageBytes: 220, maxImageEntries: 10 };
  const store = await ImageStore.open(join(f.dir, "store"), { fetchLayer: f.fetchLayer, maxBytes: 1000, imageLimits });
  await (await store.acquire(f.image("1", 0))).release();
  // A counts layer 0 (stored) at once and refuses layer 2 as it is read, 250 bytes being past 220; B, which
  // asked for layer 2 meanwhile and fits, reads it again under its own caps.
  const [a, b] = await Promise.allSettled([store.acquire(f.image("a", 0, 2)), store.acquire(f.image("b", 2))]);
  assert.equal(a.status, "rejected");
  assert.match(
    String((a as PromiseRejectedResult).reason),
    /its layers hold more than 220 bytes of files \(images\.maxImageBytes\)/,
  );
  assert.equal(((a as PromiseRejectedResult).reason as { code: number }).code, 9);
  assert.equal(b.status, "fulfilled", String((b as PromiseRejectedResult).reason));
  const acquired = (b as PromiseFulfilledResult<Awaited<ReturnType<typeof store.acquire>>>).value;
  assert.equal(await readFile(join(acquired.layerDirs[0] as string, "layer-2"), "utf8"), "2".repeat(150));
  assert.equal(f.fetches.filter((d) => d === f.digestOf(2)).length, 2, "read once for each image's caps");
  await acquired.release();
  // Entries count too, also for a layer found stored: 1 + 1 + 1 entries against a cap of 2.
  const few = await ImageStore.open(join(f.dir, "few"), {
    fetchLayer: f.fetchLayer,
    maxBytes: 1000,
    imageLimits: { ...imageLimits, maxImageBytes: 1000, maxImageEntries: 2 },
  });
  await assert.rejects(few.acquire(f.image("c", 0, 1, 2)), {
    code: 9,
    message: /more than 2 entries \(images\.maxImageEntries\)/,
  });
});

test("an image its caps refuse on layers already stored holds none of them: they stay evictable", async () => {
  const f = await fixture("refused-held", [100, 100, 100]);
  const evicted: string[] = [];
  const imageLimits = { maxLayerBytes: 1000, maxLayerEntries: 10, maxImageBytes: 150, maxImageEntries: 10 };
  const store = await ImageStore.open(join(f.dir, "store"), {
    fetchLayer: f.fetchLayer,
    maxBytes: 200,
    imageLimits,
    onEvict: (digest) => evicted.push(digest),
  });
  await (await store.acquire(f.image("1", 0))).release();
  await (await store.acquire(f.image("2", 1))).release();
  // Both layers are stored: the image is counted at once, and refused on its second layer (200 bytes > 150).
  await assert.rejects(store.acquire(f.image("h", 0, 1)), {
    code: 9,
    message: /more than 150 bytes of files \(images\.maxImageBytes\)/,
  });
  // Had the refusal left layer 1 held, layer 0 would go instead and the store would stay past its cap.
  await (await store.acquire(f.image("3", 2))).release();
  assert.deepEqual(evicted, [f.digestOf(1)]);
  assert.equal(store.usedBytes, 200);
});
