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
import { WriteBehindActionCache } from "./write-behind-action-cache.js";

async function diskCache(t: { after(fn: () => Promise<void>): void }) {
  const dir = await mkdtemp(join(tmpdir(), "berth-wb-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const files = await LruDirectory.open(join(dir, "ac"), { maxBytes: 1 << 20 });
  return { dir, disk: new DiskActionCache(files) };
}

const action = (name: string): Promise<Digest> => digestOf(SHA256, Buffer.from(name));
const result = (exitCode: number) => ActionResult.fromPartial({ exitCode });

/** An inner cache whose writes wait until released, so the test sees the window before they land. */
class HeldWrites implements ActionCache {
  readonly waiting: (() => void)[] = [];
  constructor(private readonly inner: ActionCache) {}
  get(instanceName: string, digest: Digest) {
    return this.inner.get(instanceName, digest);
  }
  async put(instanceName: string, digest: Digest, value: ActionResult) {
    await new Promise<void>((resolve) => this.waiting.push(resolve));
    await this.inner.put(instanceName, digest, value);
  }
  releaseAll() {
    for (const release of this.waiting.splice(0)) release();
  }
}

test("a result is answered at once, before and after it reaches the disk, per instance name", async (t) => {
  const { disk } = await diskCache(t);
  const held = new HeldWrites(disk);
  const cache = new WriteBehindActionCache(held);
  const digest = await action("compile a.c");
  await cache.put("main", digest, result(0));
  assert.equal(held.waiting.length, 1, "the put returned while its write is still held");
  assert.equal((await cache.get("main", digest))?.exitCode, 0);
  assert.equal(await cache.get("other", digest), undefined);
  assert.equal(await disk.get("main", digest), undefined, "not on disk yet");
  held.releaseAll();
  await cache.flush();
  assert.equal((await disk.get("main", digest))?.exitCode, 0);
  assert.equal((await cache.get("main", digest))?.exitCode, 0);
});

test("two puts of one action land in order: the later result is the one kept", async (t) => {
  const { disk } = await diskCache(t);
  const held = new HeldWrites(disk);
  const cache = new WriteBehindActionCache(held);
  const digest = await action("link app");
  await cache.put("", digest, result(1));
  await cache.put("", digest, result(2));
  assert.equal((await cache.get("", digest))?.exitCode, 2);
  while (held.waiting.length > 0 || (await disk.get("", digest))?.exitCode !== 2) {
    held.releaseAll();
    await new Promise((resolve) => setImmediate(resolve));
  }
  await cache.flush();
  assert.equal((await disk.get("", digest))?.exitCode, 2);
});

test("a write that fails is reported and the entry is then a miss", async (t) => {
  const { dir, disk } = await diskCache(t);
  const failures: string[] = [];
  const cache = new WriteBehindActionCache(disk, (_digest, error) => failures.push(error.message));
  const digest = await action("test suite");
  // Root ignores permissions, so the cache's directory is taken away instead.
  await rm(join(dir, "ac"), { recursive: true, force: true });
  await cache.put("", digest, result(0));
  await cache.flush();
  assert.equal(failures.length, 1);
  assert.equal(await cache.get("", digest), undefined);
});
