import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { type Digest, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { LruDirectory } from "../store/lru-directory.js";
import type { ActionCache } from "./action-cache.js";
import { DiskActionCache } from "./disk-action-cache.js";
import { MemoryCachedActionCache } from "./memory-cached-action-cache.js";

async function diskCache(t: { after(fn: () => Promise<void>): void }) {
  const dir = await mkdtemp(join(tmpdir(), "berth-acmem-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const files = await LruDirectory.open(join(dir, "ac"), { maxBytes: 1 << 20 });
  /** Removes every entry's file behind the cache's back: what is answered then comes from memory. */
  const wipe = async () => {
    await rm(join(dir, "ac", "files"), { recursive: true, force: true });
  };
  return { disk: new DiskActionCache(files), wipe };
}

const action = (name: string): Promise<Digest> => digestOf(SHA256, Buffer.from(name));
const result = (exitCode: number, stdout = "") =>
  ActionResult.fromPartial({ exitCode, stdoutRaw: Buffer.from(stdout) });

test("a result read or stored once is answered from memory, a fresh copy each time, per instance name", async (t) => {
  const { disk, wipe } = await diskCache(t);
  const a = await action("a");
  const b = await action("b");
  await disk.put("", a, result(1));
  const cache = new MemoryCachedActionCache(disk, 1 << 20);
  await cache.put("", b, result(2));
  assert.equal((await cache.get("", a))?.exitCode, 1, "read from the disk once");
  await wipe();
  const first = await cache.get("", a);
  assert.equal(first?.exitCode, 1);
  assert.equal((await cache.get("", b))?.exitCode, 2);
  // A caller changing its copy changes nothing of the next answer.
  if (first) first.exitCode = 99;
  assert.equal((await cache.get("", a))?.exitCode, 1);
  // Another instance name is another entry, which the disk no longer has.
  assert.equal(await cache.get("other", a), undefined);
});

test("a put replaces the result held, and one the inner cache refused is not answered from memory", async (t) => {
  const { disk } = await diskCache(t);
  const a = await action("a");
  let refuse = false;
  const refusing: ActionCache = {
    get: (instance, digest) => disk.get(instance, digest),
    put: async (instance, digest, value) => {
      if (refuse) throw new Error("disk full");
      await disk.put(instance, digest, value);
    },
  };
  const cache = new MemoryCachedActionCache(refusing, 1 << 20);
  await cache.put("", a, result(1));
  await cache.put("", a, result(2));
  assert.equal((await cache.get("", a))?.exitCode, 2);
  refuse = true;
  await assert.rejects(cache.put("", a, result(3)), /disk full/);
  // What the disk holds, not the refused result.
  assert.equal((await cache.get("", a))?.exitCode, 2);
});

test("memory stays within its cap: the least recently used go first, and a result too large is not held", async (t) => {
  const { disk, wipe } = await diskCache(t);
  const entry = ActionResult.encode(result(0, "x".repeat(1000))).finish().byteLength;
  // Room for sixteen entries, each a sixteenth of the cap (the largest held); eighteen are stored.
  const cache = new MemoryCachedActionCache(disk, 16 * entry);
  const names = Array.from({ length: 18 }, (_, i) => `action ${i}`);
  for (const name of names) await cache.put("", await action(name), result(0, "x".repeat(1000)));
  assert.equal(cache.bytes, 16 * entry);
  // The oldest held is read again: it is the most recent now, and the next oldest goes instead.
  await cache.get("", await action(names[2] as string));
  await cache.put("", await action("one more"), result(0, "x".repeat(1000)));
  await wipe();
  const held = [];
  for (const name of names) if (await cache.get("", await action(name))) held.push(name);
  assert.deepEqual(
    held,
    names.slice(2).filter((name) => name !== names[3]),
  );

  const small = new MemoryCachedActionCache(disk, 16 * 100);
  await small.put("", await action("big"), result(0, "y".repeat(200)));
  assert.equal(small.bytes, 0);
});

test("a read that began before a put does not put its older result back in memory", async (t) => {
  const { disk, wipe } = await diskCache(t);
  const a = await action("a");
  await disk.put("", a, result(1));
  let release: () => void = () => {};
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  let hold = true;
  const slowReads: ActionCache = {
    get: async (instance, digest) => {
      const held = hold;
      const found = await disk.get(instance, digest);
      if (held) await gate;
      return found;
    },
    put: (instance, digest, value) => disk.put(instance, digest, value),
  };
  const cache = new MemoryCachedActionCache(slowReads, 1 << 20);
  const early = cache.get("", a);
  hold = false;
  await cache.put("", a, result(2));
  release();
  await early;
  await wipe();
  assert.equal((await cache.get("", a))?.exitCode, 2, "memory holds the put's result");
});
