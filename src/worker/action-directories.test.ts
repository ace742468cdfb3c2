import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync, readdirSync, statSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm } from "../../test/support/farm.js";
import { ActionDirectories, INPUT_ROOT_NAME } from "./action-directories.js";

const OWNER = { uid: 65534, gid: 65534 };

test("each action gets a directory of its own, made before it arrives, with an empty input root of the slot's user", async (t) => {
  const parent = await mkdtemp(join(tmpdir(), "berth-action-dirs-"));
  t.after(() => rm(parent, { recursive: true, force: true }));
  const root = process.getuid?.() === 0;
  const directories = new ActionDirectories(parent, root ? OWNER : undefined);

  // Made on the first look, before any action takes it.
  const made = await directories.next();
  assert.ok(existsSync(join(made, INPUT_ROOT_NAME)));
  const first = await directories.take();
  assert.equal(first, made);
  const expected = join(first, INPUT_ROOT_NAME);
  assert.deepEqual(readdirSync(join(first, INPUT_ROOT_NAME)), []);
  if (root) assert.equal(statSync(expected).uid, OWNER.uid);
  // A lease id's length: a path that fits below a lease's directory fits below this one.
  assert.match(basename(first), /^[0-9a-f-]{36}$/);

  // Once the first is answered, the next is made off its path: it is on disk before the next action takes it.
  directories.prepareNext();
  await sleep(50);
  assert.equal(readdirSync(parent).length, 2);
  const second = await directories.take();
  assert.notEqual(second, first);
  assert.ok(existsSync(join(second, INPUT_ROOT_NAME)));

  // Taken with none made ahead: made then; two taken at once are two.
  const [third, fourth] = await Promise.all([directories.take(), directories.take()]);
  assert.notEqual(third, second);
  assert.notEqual(third, fourth);

  // Closing removes the one no action took, and only that one.
  directories.prepareNext();
  const untaken = await directories.next();
  await directories.close();
  assert.ok(!existsSync(untaken));
  const taken = [first, second, third, fourth].map((d) => basename(d)).sort();
  assert.deepEqual(readdirSync(parent).sort(), taken);
  directories.prepareNext();
  await sleep(20);
  assert.equal(readdirSync(parent).length, 4, "a closed slot makes no more");
});

test("what a crashed worker process left of its actions is removed as the next starts, and no action sees it", async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), "berth-leftover-"));
  t.after(() => rm(dataDir, { recursive: true, force: true }));
  const actions = join(dataDir, "worker", "actions");
  const leftover = join(actions, randomUUID());
  await mkdir(join(leftover, INPUT_ROOT_NAME, "out"), { recursive: true });
  await writeFile(join(leftover, INPUT_ROOT_NAME, "out", "half-written"), "an output never sent");
  const farm = await startTestFarm({}, dataDir, { workers: 1 });
  t.after(() => farm.close());
  for (let waited = 0; existsSync(leftover) && waited < 10_000; waited += 50) await sleep(50);
  assert.ok(!existsSync(leftover), "the leftover action directory is still there");

  const action = await uploadAction(farm.clients, { args: ["sh", "-c", "ls -A; ls -A .."], salt: randomUUID() });
  const { response } = await execute(farm.clients, action, { skipCacheLookup: true });
  assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
  assert.doesNotMatch(await readBlob(farm.clients, response.result?.stdoutDigest), /half-written|out/);
});
