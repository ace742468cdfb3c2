import assert from "node:assert/strict";
import { mkdtemp, rm, unlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { text } from "node:stream/consumers";
import { test } from "node:test";
import { type Digest, digestKey, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Code } from "../status/status.js";
import { DiskBlobStore } from "./disk-blob-store.js";
import { MemoryCachedBlobStore } from "./memory-cached-blob-store.js";

async function stores(t: { after(fn: () => Promise<void>): void }, diskBytes = 1 << 20) {
  const dir = await mkdtemp(join(tmpdir(), "berth-memcas-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  // Too small a store for the log of small blobs: every blob is a file, which the tests delete behind its back.
  const disk = await DiskBlobStore.open(join(dir, "cas"), { maxBytes: diskBytes });
  const cached = new MemoryCachedBlobStore(disk, { maxBlobBytes: 100, maxTotalBytes: 250 });
  const filePath = (digest: Digest) => join(dir, "cas", "files", digestKey(digest));
  return { dir, filePath, disk, cached };
}

async function blob(content: string): Promise<{ data: Buffer; digest: Digest }> {
  const data = Buffer.from(content);
  return { data, digest: await digestOf(SHA256, data) };
}

test("a small blob stored through the cache is served from memory, also after its file is gone behind its back", async (t) => {
  const { filePath, cached } = await stores(t);
  const { data, digest } = await blob("an Action message");
  await cached.put(digest, data);
  // Deleting the file without telling the index shows where the bytes come from.
  await unlink(filePath(digest));
  assert.deepEqual(await cached.get(digest), data);
  const part = await cached.openRead(digest, 3, 6);
  assert.ok(part);
  assert.equal(await text(part), "Action");
});

test("what the disk store evicted is missing from the cache too", async (t) => {
  const { disk, cached } = await stores(t, 64);
  const first = await blob(`first ${"x".repeat(40)}`);
  const second = await blob(`second ${"y".repeat(40)}`);
  await cached.put(first.digest, first.data);
  await cached.put(second.digest, second.data);
  assert.deepEqual(await disk.findMissing([first.digest]), [first.digest], "the disk evicted the first blob");
  assert.equal(await cached.get(first.digest), undefined);
  assert.equal(await cached.openRead(first.digest, 0, 0), undefined);
  assert.deepEqual(await cached.get(second.digest), second.data);
});

test("holds at most maxTotalBytes, dropping the least recently used, and never blobs over maxBlobBytes", async (t) => {
  const { filePath, cached } = await stores(t);
  const blobs = await Promise.all(["a", "b", "c"].map((c) => blob(c.repeat(100))));
  const large = await blob("L".repeat(101));
  for (const { digest, data } of [...blobs, large]) await cached.put(digest, data);
  // Storing c dropped a (300 bytes > 250); reading a back from disk drops b, storing d then drops c.
  await cached.get(blobs[0].digest);
  const fourth = await blob("d".repeat(100));
  await cached.put(fourth.digest, fourth.data);
  for (const { digest } of [...blobs, large, fourth]) await unlink(filePath(digest));
  // What remains in memory, a and d, is all that can still be served.
  const served = await Promise.all(
    [...blobs, large, fourth].map(
      async ({ digest }) => (await cached.get(digest).catch(() => undefined)) !== undefined,
    ),
  );
  assert.deepEqual(served, [true, false, false, false, true]);
});

test("a blob that does not match its digest is refused and not remembered", async (t) => {
  const { cached } = await stores(t);
  const { digest } = await blob("the real content");
  await assert.rejects(cached.put(digest, Buffer.from("the fake content")), { code: Code.INVALID_ARGUMENT });
  assert.equal(await cached.get(digest), undefined);
});
