import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type Digest, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { FileCache } from "./file-cache.js";
import { RemoteCas } from "./remote-cas.js";

let farm: TestFarm;
let cas: RemoteCas;
let dir: string;
before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address).withInstance("");
  dir = await mkdtemp(join(tmpdir(), "berth-file-cache-"));
});
after(async () => {
  cas.close();
  await farm.close();
  await rm(dir, { recursive: true, force: true });
});

/** A stored blob of `size` bytes of `fill`, as an input file. */
async function input(fill: string, size = 100): Promise<{ digest: Digest; executable: boolean }> {
  const data = Buffer.alloc(size, fill);
  const digest = await digestOf(SHA256, data);
  await farm.farm.cas.put(digest, data);
  return { digest, executable: false };
}

test("copies are fetched once, read-only, and the least recently used unpinned ones go past the cap", async () => {
  const cache = await FileCache.open(join(dir, "capped"), 250);
  const [a, b, c] = [await input("a"), await input("b"), await input("c")];

  const first = await cache.ensure(cas, [a, b]);
  assert.deepEqual(first.missing, []);
  first.release();
  assert.equal((await stat(cache.pathOf(a.digest, false))).mode & 0o777, 0o444);
  assert.equal(await readFile(cache.pathOf(b.digest, false), "utf8"), "b".repeat(100));

  // a is used again, so b is now the least recently used; adding c (300 bytes in all) deletes b.
  (await cache.ensure(cas, [a])).release();
  (await cache.ensure(cas, [c])).release();
  assert.equal(cache.usedBytes, 200);
  // The file itself is deleted in the background.
  const expected = [a, c].map((f) => keyOf(f.digest)).sort();
  const deadline = Date.now() + 2000;
  let names = (await readdir(join(dir, "capped"))).sort();
  while (names.length > expected.length && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    names = (await readdir(join(dir, "capped"))).sort();
  }
  assert.deepEqual(names, expected);
});

test("a pinned copy survives eviction until released; what no one needs goes at once", async () => {
  const cache = await FileCache.open(join(dir, "pinned"), 150);
  const [a, b] = [await input("p"), await input("q")];
  const held = await cache.ensure(cas, [a]);
  const other = await cache.ensure(cas, [b]);
  // Both are pinned: over the cap, but neither may go while an action is about to link it.
  assert.equal(cache.usedBytes, 200);
  assert.equal(await readFile(cache.pathOf(a.digest, false), "utf8"), "p".repeat(100));
  held.release();
  assert.equal(cache.usedBytes, 100, "a, released and least recently used, is deleted");
  other.release();
  assert.equal(cache.usedBytes, 100);
  const again = await cache.ensure(cas, [a]);
  assert.equal(await readFile(cache.pathOf(a.digest, false), "utf8"), "p".repeat(100), "fetched again");
  again.release();
});

test("blobs the CAS lacks are reported, and nothing stays pinned", async () => {
  const cache = await FileCache.open(join(dir, "missing"), 1000);
  const absent = { digest: await digestOf(SHA256, Buffer.from("never stored")), executable: true };
  const present = await input("r");
  const result = await cache.ensure(cas, [absent, present]);
  result.release();
  assert.deepEqual(result.missing, [absent.digest]);
  assert.equal((await readdir(join(dir, "missing"))).length, 1);
});

function keyOf(digest: Digest): string {
  return `${digest.fn.name}-${digest.hash}-${digest.sizeBytes}`;
}

test("with ownerWrites the copies have their owner's write bit, small and large (streamed) ones alike", async () => {
  const cache = await FileCache.open(join(dir, "owner-writes"), 1024 ** 3, { ownerWrites: true });
  const small = await input("s");
  const large = { ...(await input("l", 2 * 1024 * 1024)), executable: true };
  const { missing, release } = await cache.ensure(cas, [small, large]);
  assert.deepEqual(missing, []);
  release();
  assert.equal((await stat(cache.pathOf(small.digest, false))).mode & 0o777, 0o644);
  assert.equal((await stat(cache.pathOf(large.digest, true))).mode & 0o777, 0o755);
});
