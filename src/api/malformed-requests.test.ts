import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Client, credentials, type ServiceError } from "@grpc/grpc-js";
import { randomBlob } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, statusDetails, unaryCall } from "../../test/support/rpc.js";
import type { WriteResponse } from "../gen/google/bytestream/bytestream.js";
import { Code } from "../status/status.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm();
});
after(() => farm.close());

const HUGE = 2 ** 62;

function refusedWith(field: RegExp) {
  return (err: ServiceError) => {
    assert.equal(err.code, Code.INVALID_ARGUMENT, err.details);
    assert.match(err.details, field);
    return true;
  };
}

test("a ByteStream Read with read_offset or read_limit of 2^62 is INVALID_ARGUMENT naming the field, not INTERNAL", async () => {
  const blob = randomBlob(100);
  const resourceName = `blobs/${blob.digest.hash}/100`;
  await assert.rejects(
    collect(farm.clients.byteStream.read({ resourceName, readOffset: HUGE, readLimit: 0 })),
    refusedWith(/^read_offset: 4611686018427387904 is out of range/),
  );
  await assert.rejects(
    collect(farm.clients.byteStream.read({ resourceName, readOffset: 0, readLimit: HUGE })),
    refusedWith(/^read_limit: 4611686018427387904 is out of range/),
  );
  await assert.rejects(
    collect(farm.clients.byteStream.read({ resourceName, readOffset: -HUGE, readLimit: 0 })),
    refusedWith(/^read_offset: -4611686018427387904 is out of range/),
  );
  // The field is also named in the BadRequest details.
  const err = await collect(farm.clients.byteStream.read({ resourceName, readOffset: HUGE, readLimit: 0 })).catch(
    (e: ServiceError) => e,
  );
  assert.equal(statusDetails(err as ServiceError).badRequest?.fieldViolations[0]?.field, "read_offset");
});

test("a ByteStream Write with write_offset of 2^62 is INVALID_ARGUMENT naming the field", async () => {
  const blob = randomBlob(10);
  const result = new Promise<WriteResponse>((resolve, reject) => {
    const call = farm.clients.byteStream.write((err, res) => (err ? reject(err) : resolve(res)));
    call.write({
      resourceName: `uploads/u1/blobs/${blob.digest.hash}/10`,
      writeOffset: HUGE,
      finishWrite: true,
      data: blob.data,
    });
    call.end();
  });
  await assert.rejects(result, refusedWith(/^write_offset: 4611686018427387904 is out of range/));
});

test("a digest whose size_bytes is 2^62 is INVALID_ARGUMENT in FindMissingBlobs, BatchReadBlobs and GetActionResult", async () => {
  const digest = { hash: "a".repeat(64), sizeBytes: HUGE };
  const cas = farm.clients.cas;
  await assert.rejects(
    unaryCall(cas.findMissingBlobs.bind(cas), { instanceName: "", blobDigests: [digest], digestFunction: 0 }),
    refusedWith(/FindMissingBlobs request.*MAX_SAFE_INTEGER.*size_bytes/),
  );
  await assert.rejects(
    unaryCall(cas.batchReadBlobs.bind(cas), {
      instanceName: "",
      digests: [digest],
      acceptableCompressors: [],
      digestFunction: 0,
    }),
    refusedWith(/BatchReadBlobs request/),
  );
  const ac = farm.clients.ac;
  await assert.rejects(
    unaryCall(ac.getActionResult.bind(ac), {
      instanceName: "",
      actionDigest: digest,
      inlineStdout: false,
      inlineStderr: false,
      inlineOutputFiles: [],
      digestFunction: 0,
    }),
    refusedWith(/GetActionResult request/),
  );
  // The server still answers well-formed requests.
  const ok = await unaryCall(cas.findMissingBlobs.bind(cas), {
    instanceName: "",
    blobDigests: [{ hash: "a".repeat(64), sizeBytes: 1 }],
    digestFunction: 0,
  });
  assert.equal(ok.missingBlobDigests.length, 1);
});

test("an Execute stream whose request does not decode is INVALID_ARGUMENT", async () => {
  const stream = farm.clients.execution.execute({
    instanceName: "",
    skipCacheLookup: false,
    actionDigest: { hash: "b".repeat(64), sizeBytes: HUGE },
    executionPolicy: undefined,
    resultsCachePolicy: undefined,
    digestFunction: 0,
    inlineStdout: false,
    inlineStderr: false,
    inlineOutputFiles: [],
  });
  await assert.rejects(collect(stream), refusedWith(/Execute request/));
});

test("a request that is not a protobuf message at all is INVALID_ARGUMENT, and the connection keeps serving", async () => {
  const client = new Client(farm.address, credentials.createInsecure());
  try {
    const call = (bytes: Buffer) =>
      new Promise<Buffer>((resolve, reject) => {
        client.makeUnaryRequest(
          "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
          (b: Buffer) => b,
          (b: Buffer) => b,
          bytes,
          (err, res) => (err ? reject(err) : resolve(res as Buffer)),
        );
      });
    // Field 1 (instance_name) announces 255 bytes that never come.
    await assert.rejects(call(Buffer.from([0x0a, 0xff, 0x01, 0x41])), refusedWith(/FindMissingBlobs request/));
    assert.ok(Buffer.isBuffer(await call(Buffer.alloc(0))));
  } finally {
    client.close();
  }
});
