import assert from "node:assert/strict";
import { appendFile, mkdtemp, readdir, rm, stat, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { SegmentLog } from "./segment-log.js";

let root: string;
let count = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-segment-log-"));
});
after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

const dir = () => join(root, `log-${++count}`);
const value = (n: number, size = 100) => Buffer.alloc(size, n % 256);

test("values come back from the open log and after a restart, and a key keeps its first value", async () => {
  const path = dir();
  const log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 4096 });
  for (let n = 0; n < 100; n++) log.put(`key-${n}`, value(n));
  log.put("key-7", Buffer.from("another value"));
  assert.deepEqual(log.get("key-7"), value(7));
  assert.ok((await readdir(path)).length > 1, "100 values of 100 bytes fill more than one 4 KiB segment");
  log.close();
  const reopened = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 4096 });
  assert.equal(reopened.count, 100);
  for (let n = 0; n < 100; n++) assert.deepEqual(reopened.get(`key-${n}`), value(n), `key-${n}`);
  assert.equal(reopened.get("absent"), undefined);
  reopened.put("after-restart", value(200));
  assert.deepEqual(reopened.get("after-restart"), value(200));
  reopened.close();
});

test("a record cut short by a crash is dropped and the segment truncated; garbage after it too", async () => {
  const path = dir();
  const log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 20 });
  log.put("whole", value(1));
  log.put("torn", value(2, 1000));
  log.close();
  const [segment] = await readdir(path);
  const file = join(path, segment as string);
  const full = (await stat(file)).size;
  await truncate(file, full - 10);
  const reopened = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 20 });
  assert.deepEqual(reopened.get("whole"), value(1));
  assert.equal(reopened.has("torn"), false);
  assert.ok((await stat(file)).size < full - 1000, "the torn record is cut off");
  reopened.put("next", value(3));
  reopened.close();
  await appendFile(file, Buffer.from("not a record at all"));
  const again = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 20 });
  assert.deepEqual([again.get("whole"), again.get("next")], [value(1), value(3)]);
  assert.equal(again.count, 2);
  again.close();
});

test("past maxBytes the oldest segments go, except values used while they sat in the older half", async () => {
  const path = dir();
  const evicted: string[] = [];
  const log = await SegmentLog.open(path, {
    maxBytes: 8 * 1024,
    segmentBytes: 1024,
    onEvict: (key) => evicted.push(key),
  });
  for (let n = 0; n < 200; n++) {
    log.put(`key-${n}`, value(n));
    // key-0 is used all along, as a build's common input would be.
    assert.ok(log.touch("key-0"), `key-0 still stored after ${n}`);
  }
  assert.ok(log.usedBytes <= 8 * 1024, `${log.usedBytes} bytes`);
  assert.ok((await readdir(path)).length <= 9);
  assert.deepEqual(log.get("key-0"), value(0));
  assert.equal(log.has("key-1"), false, "an unused old value went");
  assert.ok(evicted.includes("key-1"));
  assert.equal(evicted.length + log.count, 200 + evicted.filter((k) => k === "key-0").length);
  log.close();
});

test("files in the directory that are not segments are left alone", async () => {
  const path = dir();
  const log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 20 });
  log.put("a", value(1));
  log.close();
  await writeFile(join(path, "README"), "not a segment\n");
  const reopened = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 20 });
  assert.deepEqual(reopened.get("a"), value(1));
  assert.ok((await readdir(path)).includes("README"));
  reopened.close();
});

test("sync resolves once the appends before it are flushed; appends of one turn share one flush", async () => {
  const path = dir();
  const log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 4096 });
  for (let n = 0; n < 50; n++) log.put(`key-${n}`, value(n));
  const flushes = Array.from({ length: 50 }, () => log.sync());
  assert.ok(
    flushes.every((f) => f === flushes[0]),
    "one flush for every append of this turn",
  );
  await Promise.all(flushes);
  log.put("later", value(1));
  const next = log.sync();
  assert.notEqual(next, flushes[0], "an append after a flush started waits for the next one");
  await next;
  log.close();
});

test("records found at open are unverified until the owner checks them; appended ones are verified", async () => {
  const path = dir();
  let log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 16 });
  log.put("a", value(1));
  assert.equal(log.isVerified("a"), true);
  log.close();
  log = await SegmentLog.open(path, { maxBytes: 1 << 20, segmentBytes: 1 << 16 });
  assert.equal(log.isVerified("a"), false);
  log.markVerified("a");
  assert.equal(log.isVerified("a"), true);
  log.close();
});
