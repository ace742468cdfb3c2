import assert from "node:assert/strict";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { LruDirectory } from "./lru-directory.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-lru-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

test("evicts least recently used files past the cap, keeping recently read ones", async () => {
  const dir = join(root, "evict");
  const evicted: string[] = [];
  const store = await LruDirectory.open(dir, { maxBytes: 300, onEvict: (key) => evicted.push(key) });
  await store.writeFile("a", Buffer.alloc(100, 1));
  await store.writeFile("b", Buffer.alloc(100, 2));
  await store.writeFile("c", Buffer.alloc(100, 3));
  assert.ok(await store.readFile("a")); // a is now more recent than b
  await store.writeFile("d", Buffer.alloc(100, 4));
  assert.deepEqual(evicted, ["b"]);
  assert.equal(store.has("b"), false);
  assert.equal(await store.readFile("b"), undefined);
  assert.equal(store.usedBytes, 300);
  assert.deepEqual((await readdir(join(dir, "files"))).sort(), ["a", "c", "d"]);
});

test("rebuilds its index after a restart and drops half-written temporaries", async () => {
  const dir = join(root, "restart");
  const first = await LruDirectory.open(dir, { maxBytes: 1000 });
  await first.writeFile("x/y/z", Buffer.from("hello"));
  await writeFile(join(dir, "tmp", "partial"), "half a blob");
  const second = await LruDirectory.open(dir, { maxBytes: 1000 });
  assert.equal(second.count, 1);
  assert.equal(second.usedBytes, 5);
  assert.equal((await second.readFile("x/y/z"))?.toString(), "hello");
  assert.deepEqual(await readdir(join(dir, "tmp")), []);
});

test("refuses a single file larger than the whole cap", async () => {
  const store = await LruDirectory.open(join(root, "big"), { maxBytes: 10 });
  await assert.rejects(store.writeFile("big", Buffer.alloc(11)), /does not fit in a store capped at 10 bytes/);
  assert.equal(store.count, 0);
});

test("a committed key counts once however often it is written", async () => {
  const store = await LruDirectory.open(join(root, "twice"), { maxBytes: 1000 });
  await Promise.all([1, 2, 3].map(() => store.writeFile("same", Buffer.alloc(10))));
  assert.equal(store.count, 1);
  assert.equal(store.usedBytes, 10);
});

test("ranged reads return exactly the asked bytes", async () => {
  const store = await LruDirectory.open(join(root, "range"), { maxBytes: 1000 });
  await store.writeFile("r", Buffer.from("0123456789"));
  const read = async (start: number, end: number) => {
    const stream = await store.openRead("r", start, end, 4);
    assert.ok(stream);
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks).toString();
  };
  assert.equal(await read(0, 10), "0123456789");
  assert.equal(await read(3, 7), "3456");
  assert.equal(await read(10, 10), "");
  assert.equal(await store.openRead("absent", 0, 1, 4), undefined);
});

test("makeRoom evicts least recently used files, never the one kept, and reports the bytes freed", async () => {
  const dir = join(root, "room");
  const evicted: string[] = [];
  const store = await LruDirectory.open(dir, { maxBytes: 10_000, onEvict: (key) => evicted.push(key) });
  for (const key of ["a", "b", "c", "d"]) await store.writeFile(key, Buffer.alloc(100, 1));
  assert.equal(await store.makeRoom(150, "a"), 200);
  assert.deepEqual(evicted, ["b", "c"]);
  assert.deepEqual((await readdir(join(dir, "files"))).sort(), ["a", "d"]);
  assert.equal(store.usedBytes, 200);
  assert.equal(await store.makeRoom(1000), 200);
  assert.equal(store.count, 0);
});
