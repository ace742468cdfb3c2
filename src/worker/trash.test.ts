import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { Trash, type TrashOptions } from "./trash.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-trash-"));
});
after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

const OPTIONS: TrashOptions = { idleMs: 100, maxPendingDirectories: 3, maxPendingBytes: 1000, batchSize: 2 };

/** A directory tree like an action's, in a directory of the test's own. */
async function actionDir(parent: string, name: string): Promise<string> {
  const dir = join(parent, name);
  await mkdir(join(dir, "root", "a", "b"), { recursive: true });
  await writeFile(join(dir, "root", "a", "b", "out.txt"), "output\n");
  return dir;
}

/** Waits until `check` holds, for at most two seconds. */
async function eventually(check: () => Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await check()) return;
    await sleep(10);
  }
  assert.fail(`never: ${what}`);
}

const entries = async (dir: string) => (await readdir(dir)).length;

test("directories discarded while an action runs wait until the worker has been idle", async () => {
  const dir = join(root, "idle");
  const trash = await Trash.open(join(dir, "trash"), OPTIONS);
  const release = trash.hold();
  await trash.discard(await actionDir(dir, "one"));
  await trash.discard(await actionDir(dir, "two"));
  await sleep(OPTIONS.idleMs * 3);
  assert.equal(await entries(join(dir, "trash")), 2, "nothing is removed while an action runs");
  assert.equal(trash.pendingCount, 2);
  release();
  const again = trash.hold();
  await sleep(OPTIONS.idleMs / 2);
  again();
  await eventually(async () => (await entries(join(dir, "trash"))) === 0, "the trash empties once idle");
  assert.deepEqual((await readdir(dir)).sort(), ["trash"], "the discarded directories are gone, not left behind");
});

test("past the caps, removal runs even while actions do", async () => {
  const dir = join(root, "caps");
  const trash = await Trash.open(join(dir, "trash"), OPTIONS);
  const release = trash.hold();
  for (const name of ["1", "2", "3", "4"]) await trash.discard(await actionDir(dir, name));
  await eventually(async () => trash.pendingCount <= OPTIONS.maxPendingDirectories, "the directory cap is kept");
  const bytes = await Trash.open(join(dir, "trash-bytes"), OPTIONS);
  const releaseBytes = bytes.hold();
  await bytes.discard(await actionDir(dir, "large"), OPTIONS.maxPendingBytes + 1);
  await eventually(async () => (await entries(join(dir, "trash-bytes"))) === 0, "the byte cap is kept");
  release();
  releaseBytes();
});

test("drain removes everything at once, busy or not; leftovers of an earlier run go when idle", async () => {
  const dir = join(root, "drain");
  const trash = await Trash.open(join(dir, "trash"), OPTIONS);
  const release = trash.hold();
  await trash.discard(await actionDir(dir, "x"));
  await trash.drain();
  assert.equal(await entries(join(dir, "trash")), 0);
  release();

  await actionDir(join(dir, "trash"), "left-by-a-crash");
  const reopened = await Trash.open(join(dir, "trash"), OPTIONS);
  assert.equal(reopened.pendingCount, 1);
  await eventually(async () => (await entries(join(dir, "trash"))) === 0, "leftovers are removed");
});
