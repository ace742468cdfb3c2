import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtemp, open, readdir, rm, rmdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import type { ServiceError } from "@grpc/grpc-js";
import { randomBlob, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { Compressor_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

const run = promisify(execFile);
const MIB = 1024 ** 2;
let dataDir: string;
let farm: TestFarm | undefined;

before(async () => {
  dataDir = await mkdtemp(join(tmpdir(), "berth-full-disk-"));
  await run("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", dataDir]);
  farm = await startTestFarm({ cas: { memoryCacheSizeBytes: 0 } }, dataDir);
});
after(async () => {
  await farm?.close();
  await run("umount", [dataDir]).catch(() => run("umount", ["-l", dataDir]));
  await rmdir(dataDir);
});

type Blob = { data: Buffer; digest: WireDigest };

/** Uploads by ByteStream in `chunk`-byte messages: the call's status code (0: stored) and message. */
async function upload(blob: Blob, chunk: number): Promise<{ code: number; message: string }> {
  const clients = (farm as TestFarm).clients;
  return new Promise((resolve) => {
    const call = clients.byteStream.write((err) =>
      resolve(err ? { code: err.code, message: err.details } : { code: 0, message: "" }),
    );
    const resourceName = `uploads/${randomUUID()}/blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`;
    for (let at = 0; at < blob.data.byteLength; at += chunk) {
      const data = blob.data.subarray(at, at + chunk);
      call.write({ resourceName, writeOffset: at, finishWrite: at + chunk >= blob.data.byteLength, data });
    }
    call.end();
  });
}

async function missing(blobs: Blob[]): Promise<string[]> {
  const clients = (farm as TestFarm).clients;
  const response = await unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), {
    instanceName: "",
    blobDigests: blobs.map((b) => b.digest),
    digestFunction: 0,
  });
  return response.missingBlobDigests.map((d) => d.hash);
}

async function read(blob: Blob): Promise<Buffer | number> {
  const clients = (farm as TestFarm).clients;
  try {
    const parts = await collect(
      clients.byteStream.read({
        resourceName: `blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`,
        readOffset: 0,
        readLimit: 0,
      }),
    );
    return Buffer.concat(parts.map((p) => p.data));
  } catch (err) {
    return (err as ServiceError).code;
  }
}

/** Writes a file outside the farm's stores until the file system is full. */
async function fillUp(path: string): Promise<void> {
  const handle = await open(path, "w");
  const block = Buffer.alloc(64 * 1024, 1);
  try {
    for (;;) await handle.write(block);
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, "ENOSPC");
  } finally {
    await handle.close();
  }
}

test("on an 8 MiB data directory, uploads past its size evict the least recently used blobs and are stored", async () => {
  const blobs = Array.from({ length: 12 }, () => randomBlob(MIB));
  for (const [i, blob] of blobs.entries()) {
    // Whole in one message (stored from memory) and streamed in pieces (a positioned writer) by turns.
    const result = await upload(blob, i % 2 === 0 ? MIB : 256 * 1024);
    assert.equal(result.code, 0, `upload ${i}: ${result.message}`);
  }
  const gone = await missing(blobs);
  assert.ok(gone.length >= 4, `12 MiB cannot all fit in 8 MiB; missing: ${gone.length}`);
  assert.ok(!gone.includes((blobs[11] as Blob).digest.hash), "the last upload is stored");
  for (const blob of blobs) {
    const served = await read(blob);
    if (gone.includes(blob.digest.hash)) assert.equal(served, Code.NOT_FOUND);
    else assert.deepEqual(served, blob.data, "what is reported present is served whole");
  }
});

test("a blob larger than the whole disk, or any blob when others filled it, is RESOURCE_EXHAUSTED naming the data directory and the blob; nothing half-written stays", async () => {
  // A farm whose CAS holds nothing: with blobs of the test above still stored, eviction could make room for
  // the uploads below once the file system is full, and they would rightly succeed.
  await (farm as TestFarm).close();
  for (const entry of await readdir(dataDir)) await rm(join(dataDir, entry), { recursive: true, force: true });
  farm = await startTestFarm({ cas: { memoryCacheSizeBytes: 0 } }, dataDir);
  const huge = randomBlob(10 * MIB);
  const refused = await upload(huge, MIB);
  assert.equal(refused.code, Code.RESOURCE_EXHAUSTED, refused.message);
  assert.match(refused.message, new RegExp(`blob ${huge.digest.hash}/${10 * MIB}`));
  assert.ok(refused.message.includes(join(dataDir, "cas")), refused.message);
  assert.match(refused.message, /ENOSPC/);
  assert.deepEqual(await missing([huge]), [huge.digest.hash]);
  assert.deepEqual(await readdir(join(dataDir, "cas", "tmp")), [], "the partial upload is gone");

  // Someone else fills the file system: eviction cannot help any more.
  const ballast = join(dataDir, "ballast");
  await fillUp(ballast);
  const large = randomBlob(MIB);
  for (const chunk of [MIB, 256 * 1024]) {
    const full = await upload(large, chunk);
    assert.equal(full.code, Code.RESOURCE_EXHAUSTED, full.message);
  }
  const small = [randomBlob(2000), randomBlob(3000)];
  const clients = (farm as TestFarm).clients;
  const batch = await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), {
    instanceName: "",
    digestFunction: 0,
    requests: small.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
  });
  for (const response of batch.responses) {
    assert.equal(response.status?.code, Code.RESOURCE_EXHAUSTED, response.status?.message);
    assert.match(response.status?.message ?? "", /data directory .* is full/);
  }
  assert.deepEqual((await missing([large, ...small])).length, 3, "nothing refused is reported present");
  for (const blob of [large, ...small]) assert.equal(await read(blob), Code.NOT_FOUND);

  // Room again: the same uploads succeed and are served whole.
  await rm(ballast);
  assert.equal((await upload(large, 256 * 1024)).code, 0);
  assert.deepEqual(
    (
      await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), {
        instanceName: "",
        digestFunction: 0,
        requests: small.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
      })
    ).responses.map((r) => r.status?.code),
    [0, 0],
  );
  for (const blob of [large, ...small]) assert.deepEqual(await read(blob), blob.data);

  // And after a restart, what the full disk interrupted is not served either.
  farm = await (farm as TestFarm).restart();
  assert.deepEqual(await missing([large, ...small]), []);
  assert.deepEqual(await missing([huge]), [huge.digest.hash]);
});
