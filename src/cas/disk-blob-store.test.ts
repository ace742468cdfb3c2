import assert from "node:assert/strict";
import { mkdir, mkdtemp, open, readdir, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { text } from "node:stream/consumers";
import { after, before, test } from "node:test";
import { type Digest, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Code, type StatusError } from "../status/status.js";
import { DiskBlobStore, LOGGED_BLOB_BYTES } from "./disk-blob-store.js";

let root: string;
let count = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-disk-cas-"));
});
after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

const STORE_BYTES = 64 * 1024 ** 2;

async function blob(data: Buffer): Promise<{ data: Buffer; digest: Digest }> {
  return { data, digest: await digestOf(SHA256, data) };
}

/** Every file below `dir`, relative to it. */
async function filesIn(dir: string): Promise<string[]> {
  return (await readdir(dir, { recursive: true, withFileTypes: true }))
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath ?? e.path, e.name).slice(dir.length + 1));
}

test("small blobs go to the log, large ones to files; both come back whole and in parts, also after a restart", async () => {
  const dir = join(root, `cas-${++count}`);
  let store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const small = await blob(Buffer.from("a Directory message, say"));
  const edge = await blob(Buffer.alloc(LOGGED_BLOB_BYTES, 1));
  const large = await blob(Buffer.alloc(LOGGED_BLOB_BYTES + 1, 2));
  for (const b of [small, edge, large]) await store.put(b.digest, b.data);
  const files = await filesIn(dir);
  assert.deepEqual(
    files.filter((f) => f.startsWith("files/")),
    [`files/sha256/${large.digest.hash.slice(0, 2)}/${large.digest.hash}-${large.digest.sizeBytes}`],
    "only the blob over the log's limit has a file of its own",
  );
  assert.equal(files.filter((f) => f.startsWith("log/")).length, 1);
  for (let round = 0; round < 2; round++) {
    for (const b of [small, edge, large]) {
      assert.deepEqual(await store.findMissing([b.digest]), []);
      assert.deepEqual(await store.get(b.digest), b.data);
    }
    const part = await store.openRead(small.digest, 2, 9);
    assert.equal(part && (await text(part)), "Directory");
    assert.deepEqual(store.usage.count, 3);
    store.close();
    store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  }
  store.close();
});

test("streamed uploads of small blobs are verified and land in the log", async () => {
  const dir = join(root, `cas-${++count}`);
  const store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const b = await blob(Buffer.from("uploaded in three pieces"));
  const writer = await store.createWriter(b.digest);
  for (const piece of [b.data.subarray(0, 5), b.data.subarray(5, 12), b.data.subarray(12)]) await writer.write(piece);
  await writer.commit();
  assert.deepEqual(await store.get(b.digest), b.data);
  assert.deepEqual(
    (await filesIn(dir)).filter((f) => f.startsWith("files/")),
    [],
  );

  const wrong = await store.createWriter((await blob(Buffer.from("what the name promises"))).digest);
  await wrong.write(Buffer.from("what the name betrays!"));
  await assert.rejects(wrong.commit(), /not [0-9a-f]{64} as the resource name says/);
  const tooLong = await store.createWriter(b.digest);
  await assert.rejects(tooLong.write(Buffer.alloc(b.data.byteLength + 1)), /more than 24 bytes/);
  store.close();
});

test("a logged blob whose bytes on disk went bad is not served: it is missing from then on", async () => {
  const dir = join(root, `cas-${++count}`);
  let store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const b = await blob(Buffer.from("bytes that will be damaged on disk"));
  await store.put(b.digest, b.data);
  store.close();
  const [segment] = await readdir(join(dir, "log"));
  const handle = await open(join(dir, "log", segment as string), "r+");
  const { size } = await handle.stat();
  await handle.write(Buffer.from("XXXX"), 0, 4, size - 6);
  await handle.close();
  store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  assert.equal(await store.get(b.digest), undefined);
  assert.deepEqual(await store.findMissing([b.digest]), [b.digest]);
  await store.put(b.digest, b.data);
  assert.deepEqual(await store.get(b.digest), b.data, "stored again, it is served again");
  store.close();
});

test("blob files found at start are trusted only once hashed: a wrong size is dropped at open, a wrong hash at first use", async () => {
  const dir = join(root, `cas-${++count}`);
  let store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const [short, flipped, intact, streamed] = await Promise.all(
    [1, 2, 3, 4].map((n) => blob(Buffer.alloc(LOGGED_BLOB_BYTES * 2, n))),
  );
  for (const b of [short, flipped, intact, streamed]) await store.put(b.digest, b.data);
  store.close();
  const fileOf = (b: { digest: Digest }) =>
    join(dir, "files", "sha256", b.digest.hash.slice(0, 2), `${b.digest.hash}-${b.digest.sizeBytes}`);
  await truncate(fileOf(short), 1000);
  for (const b of [flipped, streamed]) {
    const handle = await open(fileOf(b), "r+");
    await handle.write(Buffer.from("X"), 0, 1, 5);
    await handle.close();
  }
  const damaged: string[] = [];
  store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES, onDamaged: (key) => damaged.push(key) });
  assert.equal(damaged.length, 1, "the file of the wrong size goes at open, without being read");
  assert.equal(store.unverifiedCount, 3);
  // Neither FindMissingBlobs nor the background check came first: the read itself finds the damage.
  assert.equal(await store.get(flipped.digest), undefined);
  assert.equal(await store.openRead(streamed.digest, 0, 0), undefined);
  assert.deepEqual(await store.get(intact.digest), intact.data);
  assert.equal(store.unverifiedCount, 0);
  assert.deepEqual(await store.findMissing([short.digest, flipped.digest, intact.digest, streamed.digest]), [
    short.digest,
    flipped.digest,
    streamed.digest,
  ]);
  assert.equal(damaged.length, 3);
  // An upload stores them again, and they are served.
  for (const b of [short, flipped]) await store.put(b.digest, b.data);
  const writer = await store.createWriter(streamed.digest);
  await writer.write(streamed.data);
  await writer.commit();
  for (const b of [short, flipped, streamed]) assert.deepEqual(await store.get(b.digest), b.data);
  store.close();
});

test("the background check hashes every blob file found at start once and drops the damaged ones", async () => {
  const dir = join(root, `cas-${++count}`);
  let store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const blobs = await Promise.all([1, 2, 3].map((n) => blob(Buffer.alloc(LOGGED_BLOB_BYTES + n, n))));
  for (const b of blobs) await store.put(b.digest, b.data);
  store.close();
  const bad = blobs[1] as { digest: Digest };
  const handle = await open(
    join(dir, "files", "sha256", bad.digest.hash.slice(0, 2), `${bad.digest.hash}-${bad.digest.sizeBytes}`),
    "r+",
  );
  await handle.write(Buffer.from("X"), 0, 1, 0);
  await handle.close();
  store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  assert.deepEqual(await store.verifyAll(), { checked: 3, dropped: 1 });
  assert.deepEqual(await store.verifyAll(), { checked: 0, dropped: 0 }, "once per process");
  assert.deepEqual(await store.findMissing(blobs.map((b) => b.digest)), [bad.digest]);
  store.close();
});

test("large streamed uploads, hashed on a thread from their files, are verified as small ones are, and leave nothing behind", async () => {
  const dir = join(root, `cas-${++count}`);
  const store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const fds = async () => (await readdir("/proc/self/fd")).length;
  const data = Buffer.alloc(6 * 1024 ** 2);
  for (let i = 0; i < data.byteLength; i += 4) data.writeUInt32LE(i, i);
  const b = await blob(data);
  // Uneven pieces, so that writes overlap and end in another order than they started.
  const pieces = (bytes: Buffer) => [
    bytes.subarray(0, 100_000),
    bytes.subarray(100_000, 3_000_001),
    bytes.subarray(3_000_001),
  ];
  const good = await store.createWriter(b.digest);
  for (const piece of pieces(b.data)) await good.write(piece);
  await good.commit();
  assert.deepEqual(await store.get(b.digest), b.data);
  // Counted once the thread runs (it has descriptors of its own), and nothing of the first upload is left.
  const before = await fds();

  // One byte changed in the middle: the thread's hash from the file must tell.
  const other = Buffer.from(data);
  other[4_000_000] = (other[4_000_000] as number) ^ 1;
  const otherDigest = (await blob(Buffer.from(other.subarray(0, 1)))).digest; // any other name
  const wrong = await store.createWriter({ ...b.digest, hash: otherDigest.hash });
  for (const piece of pieces(other)) await wrong.write(piece);
  await assert.rejects(wrong.commit(), /the uploaded data's sha256 is [0-9a-f]{64}, not [0-9a-f]{64}/);
  const changed = await store.createWriter(b.digest);
  for (const piece of pieces(other)) await changed.write(piece);
  await assert.rejects(changed.commit(), new RegExp(`not ${b.digest.hash} as the resource name says`));

  const short = await store.createWriter(b.digest);
  await short.write(b.data.subarray(0, 5_000_000));
  await assert.rejects(short.commit(), /the upload ended after 5000000 bytes/);
  const abandoned = await store.createWriter(b.digest);
  await abandoned.write(b.data.subarray(0, 5_000_000));
  await abandoned.abort();

  // No temporary file, and (the thread's descriptors included) no descriptor left open.
  assert.deepEqual(
    (await filesIn(dir)).filter((f) => !f.startsWith("files/sha256/") && !f.startsWith("log/")),
    [],
  );
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(await fds(), before);
  store.close();
});

test("a file taken in (adoptFile) becomes the blob by a move, small or large; a wrong size is refused; the file is gone either way", async () => {
  const dir = join(root, `cas-${++count}`);
  let store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  const outside = join(root, `downloads-${count}`);
  await mkdir(outside);
  const place = async (name: string, data: Buffer) => {
    const path = join(outside, name);
    await writeFile(path, data);
    return path;
  };
  const small = await blob(Buffer.from("a small download"));
  const large = await blob(Buffer.alloc(LOGGED_BLOB_BYTES + 7, 5));
  for (const b of [small, large]) await store.adoptFile(b.digest, await place("file", b.data), { durable: false });
  assert.deepEqual(await store.get(small.digest), small.data);
  assert.deepEqual(await store.get(large.digest), large.data);
  // A blob held already: the file is dropped, the blob stays.
  await store.adoptFile(large.digest, await place("again", large.data));
  assert.deepEqual(await store.get(large.digest), large.data);
  // A file whose size is not the digest's is not taken in.
  const other = await blob(Buffer.alloc(LOGGED_BLOB_BYTES + 9, 6));
  await assert.rejects(
    store.adoptFile(other.digest, await place("short", other.data.subarray(1))),
    (err: StatusError) => err.code === Code.INVALID_ARGUMENT && /has \d+ bytes, not \d+/.test(err.message),
  );
  assert.deepEqual(await store.findMissing([other.digest]), [other.digest]);
  assert.deepEqual(await readdir(outside), [], "every file given was moved or removed");
  assert.deepEqual(
    (await filesIn(dir)).filter((f) => f.startsWith("tmp")),
    [],
    "nothing left in the store's temporary directory",
  );
  // Taken-in files are blob files like any other: still there after a restart.
  store.close();
  store = await DiskBlobStore.open(dir, { maxBytes: STORE_BYTES });
  assert.deepEqual(await store.get(large.digest), large.data);
  store.close();
});
