import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { RootDisks } from "./root-disks.js";

// Root disks are made on the host (a read-only overlay mount and mkfs.erofs): no VM boots here.

let dir: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-root-disks-"));
});
after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A layer folder with one file of `bytes` random bytes. */
async function layer(name: string, bytes: number): Promise<string> {
  const path = join(dir, "layers", name);
  await mkdir(path, { recursive: true });
  await writeFile(join(path, `${name}.bin`), Buffer.alloc(bytes, name));
  return path;
}

function mounted(path: string): boolean {
  return readFileSync("/proc/self/mountinfo", "utf8").includes(` ${path} `);
}

test("a disk is made once per image, and the least recently used go past the cap, never one held", async () => {
  const disks = await RootDisks.open({ dir: join(dir, "capped"), maxBytes: 3 * 1024 ** 2 });
  const [a, b, c] = [await layer("a", 1024 ** 2), await layer("b", 1024 ** 2), await layer("c", 1024 ** 2)];
  const first = await disks.acquire([a, b]);
  const again = await disks.acquire([a, b]);
  assert.equal(again.path, first.path, "the same layers, the same disk");
  await again.release();
  // Held: a second image past the cap does not take the first one's disk away.
  const second = await disks.acquire([c, b]);
  assert.ok(existsSync(first.path));
  await first.release();
  await second.release();
  const third = await disks.acquire([a, c]);
  await third.release();
  assert.equal(existsSync(first.path), false, "the least recently used disk went");
  assert.ok(existsSync(third.path));
  // Nothing half-made or mounted is left beside the disks.
  assert.deepEqual(
    (await readdir(join(dir, "capped"))).filter((name) => !name.endsWith(".erofs")),
    [],
  );
  await disks.close();
});

test("a merge a killed worker left mounted is unmounted and removed when the store opens; its disks stay", async () => {
  const store = join(dir, "crashed");
  const disks = await RootDisks.open({ dir: store, maxBytes: 1024 ** 3 });
  const kept = await disks.acquire([await layer("d", 4096), await layer("e", 4096)]);
  await kept.release();
  await disks.close();
  // What a worker killed in the middle of a build leaves: the layers mounted read-only under .merge-*.
  const merged = join(store, ".merge-0123456789abcdef", "merged");
  await mkdir(merged, { recursive: true });
  const [d, e] = [join(dir, "layers", "d"), join(dir, "layers", "e")];
  execFileSync("mount", ["-t", "overlay", "overlay", "-o", `ro,lowerdir=${e}:${d}`, merged]);
  await writeFile(join(store, `${"f".repeat(64)}.erofs.partial`), "half a disk");
  assert.ok(mounted(merged));
  const reopened = await RootDisks.open({ dir: store, maxBytes: 1024 ** 3 });
  assert.equal(mounted(merged), false);
  assert.deepEqual(await readdir(store), [kept.path.slice(store.length + 1)]);
  await reopened.close();
});
