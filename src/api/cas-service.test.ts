import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { blake3 } from "hash-wasm";
import { compress, decompress } from "zstd-napi";
import { directoryBlob, EMPTY_SHA256, randomBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, statusDetails, unaryCall } from "../../test/support/rpc.js";
import { Compressor_Value, DigestFunction_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

const BATCH_LIMIT = 256 * 1024;
let farm: TestFarm;

before(async () => {
  farm = await startTestFarm({ cas: { maxBatchTotalSizeBytes: BATCH_LIMIT }, instanceNames: ["", "main"] });
});
after(() => farm.close());

const findMissing = (digests: WireDigest[], digestFunction = 0, instanceName = "") =>
  unaryCall(farm.clients.cas.findMissingBlobs.bind(farm.clients.cas), {
    instanceName,
    blobDigests: digests,
    digestFunction,
  });

const batchUpdate = (
  requests: { digest: WireDigest; data: Buffer; compressor?: Compressor_Value }[],
  digestFunction = 0,
) =>
  unaryCall(farm.clients.cas.batchUpdateBlobs.bind(farm.clients.cas), {
    instanceName: "",
    requests: requests.map((r) => ({ compressor: Compressor_Value.IDENTITY, ...r })),
    digestFunction,
  });

const batchRead = (digests: WireDigest[], acceptableCompressors: Compressor_Value[] = [], digestFunction = 0) =>
  unaryCall(farm.clients.cas.batchReadBlobs.bind(farm.clients.cas), {
    instanceName: "",
    digests,
    acceptableCompressors,
    digestFunction,
  });

async function rejectsWith(promise: Promise<unknown>, code: number, message: RegExp): Promise<ServiceError> {
  let caught: ServiceError | undefined;
  await assert.rejects(promise, (err: ServiceError) => {
    caught = err;
    assert.equal(err.code, code, err.details);
    assert.match(err.details, message);
    return true;
  });
  return caught as ServiceError;
}

describe("FindMissingBlobs and BatchUpdateBlobs", () => {
  test("reports exactly the blobs not stored; the empty blob is always present", async () => {
    const present = randomBlob(100);
    const absent = randomBlob(100);
    await batchUpdate([present]);
    const response = await findMissing([present.digest, absent.digest, EMPTY_SHA256]);
    assert.deepEqual(response.missingBlobDigests, [absent.digest]);
  });

  test("a blob whose bytes do not match its digest is refused per blob and never stored", async () => {
    const good = randomBlob(64);
    const liar = randomBlob(64);
    const wrongSize = randomBlob(10);
    const response = await batchUpdate([
      good,
      { digest: liar.digest, data: randomBlob(64).data },
      { digest: { ...wrongSize.digest, sizeBytes: 11 }, data: wrongSize.data },
    ]);
    assert.deepEqual(
      response.responses.map((r) => r.status?.code),
      [Code.OK, Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT],
    );
    assert.match(response.responses[1]?.status?.message ?? "", /requests\[1\].*sha256 is/);
    assert.match(response.responses[2]?.status?.message ?? "", /10 bytes were sent for a blob of 11/);
    const missing = await findMissing([good.digest, liar.digest]);
    assert.deepEqual(missing.missingBlobDigests, [liar.digest]);
  });

  test("zstd-compressed entries are stored uncompressed and verified", async () => {
    const data = Buffer.alloc(50_000, "abcdefgh");
    const digest = sha256(data);
    const response = await batchUpdate([{ digest, data: compress(data), compressor: Compressor_Value.ZSTD }]);
    assert.equal(response.responses[0]?.status?.code, Code.OK);
    const read = await batchRead([digest]);
    assert.ok(read.responses[0]?.data.equals(data));

    const bomb = Buffer.alloc(100_000, 7);
    const small = sha256(bomb.subarray(0, 10));
    const refused = await batchUpdate([
      { digest: small, data: compress(bomb), compressor: Compressor_Value.ZSTD },
      { digest: small, data: Buffer.from("not zstd at all"), compressor: Compressor_Value.ZSTD },
      { digest: small, data: bomb.subarray(0, 10), compressor: Compressor_Value.DEFLATE },
    ]);
    assert.match(refused.responses[0]?.status?.message ?? "", /decompresses to more than the 10 bytes/);
    assert.match(refused.responses[1]?.status?.message ?? "", /not valid zstd/);
    assert.match(refused.responses[2]?.status?.message ?? "", /compressor DEFLATE is not supported/);
    assert.ok(refused.responses.every((r) => r.status?.code === Code.INVALID_ARGUMENT));
    assert.deepEqual((await findMissing([small])).missingBlobDigests, [small]);
  });

  test("a batch over max_batch_total_size_bytes is refused naming the limit", async () => {
    const blobs = [randomBlob(BATCH_LIMIT / 2), randomBlob(BATCH_LIMIT / 2 + 1)];
    await rejectsWith(
      batchUpdate(blobs),
      Code.INVALID_ARGUMENT,
      new RegExp(`max_batch_total_size_bytes \\(${BATCH_LIMIT}\\)`),
    );
    await rejectsWith(batchRead(blobs.map((b) => b.digest)), Code.INVALID_ARGUMENT, /max_batch_total_size_bytes/);
    assert.equal((await findMissing(blobs.map((b) => b.digest))).missingBlobDigests.length, 2);
  });

  test("malformed digests get INVALID_ARGUMENT with a BadRequest naming the field", async () => {
    const good = randomBlob(3).digest;
    const err = await rejectsWith(
      findMissing([good, { hash: "xyz", sizeBytes: 1 }]),
      Code.INVALID_ARGUMENT,
      /blob_digests\[1\]\.hash/,
    );
    assert.equal(statusDetails(err).badRequest?.fieldViolations[0]?.field, "blob_digests[1].hash");
    await rejectsWith(findMissing([{ hash: good.hash, sizeBytes: -5 }]), Code.INVALID_ARGUMENT, /size_bytes.*-5/);
    await rejectsWith(
      findMissing([{ hash: good.hash.toUpperCase(), sizeBytes: 3 }]),
      Code.INVALID_ARGUMENT,
      /not lowercase hexadecimal/,
    );
    await rejectsWith(findMissing([good], DigestFunction_Value.VSO), Code.INVALID_ARGUMENT, /VSO is not supported/);
    await rejectsWith(findMissing([good], 0, "other"), Code.INVALID_ARGUMENT, /unknown instance name "other"/);
    // The server is still up and serving.
    assert.deepEqual((await findMissing([EMPTY_SHA256])).missingBlobDigests, []);
  });
});

describe("digest functions", () => {
  const vectors: [DigestFunction_Value, (data: Buffer) => Promise<string>][] = [
    [DigestFunction_Value.SHA1, async (d) => createHash("sha1").update(d).digest("hex")],
    [DigestFunction_Value.SHA384, async (d) => createHash("sha384").update(d).digest("hex")],
    [DigestFunction_Value.SHA512, async (d) => createHash("sha512").update(d).digest("hex")],
    [DigestFunction_Value.MD5, async (d) => createHash("md5").update(d).digest("hex")],
    [DigestFunction_Value.BLAKE3, (d) => blake3(d)],
  ];
  for (const [fn, hash] of vectors) {
    test(`${DigestFunction_Value[fn]} blobs round-trip and are kept apart from SHA-256`, async () => {
      const data = randomBlob(1000).data;
      const digest = { hash: await hash(data), sizeBytes: data.byteLength };
      const stored = await batchUpdate([{ digest, data }], fn);
      assert.equal(stored.responses[0]?.status?.code, Code.OK, stored.responses[0]?.status?.message);
      assert.deepEqual((await findMissing([digest], fn)).missingBlobDigests, []);
      const read = await batchRead([digest], [], fn);
      assert.ok(read.responses[0]?.data.equals(data));
      const wrong = await batchUpdate([{ digest, data: randomBlob(1000).data }], fn);
      assert.equal(wrong.responses[0]?.status?.code, Code.INVALID_ARGUMENT);
    });
  }

  test("a SHA-256-length hash under BLAKE3 is a different blob", async () => {
    const blob = randomBlob(32);
    await batchUpdate([blob]);
    assert.deepEqual((await findMissing([blob.digest], DigestFunction_Value.BLAKE3)).missingBlobDigests, [blob.digest]);
  });
});

describe("BatchReadBlobs", () => {
  test("honours acceptable_compressors and reports missing blobs per blob", async () => {
    const compressible = Buffer.alloc(20_000, "berth ");
    const digest = sha256(compressible);
    await batchUpdate([{ digest, data: compressible }]);
    const absent = randomBlob(5).digest;
    const plain = await batchRead([digest, absent, EMPTY_SHA256]);
    assert.equal(plain.responses[0]?.compressor, Compressor_Value.IDENTITY);
    assert.ok(plain.responses[0]?.data.equals(compressible));
    assert.equal(plain.responses[1]?.status?.code, Code.NOT_FOUND);
    assert.match(plain.responses[1]?.status?.message ?? "", new RegExp(absent.hash));
    assert.equal(plain.responses[2]?.status?.code, Code.OK);
    assert.equal(plain.responses[2]?.data.byteLength, 0);

    const zstd = await batchRead([digest], [Compressor_Value.ZSTD]);
    assert.equal(zstd.responses[0]?.compressor, Compressor_Value.ZSTD);
    assert.ok((zstd.responses[0]?.data.byteLength ?? 0) < compressible.byteLength);
    assert.ok(decompress(zstd.responses[0]?.data ?? Buffer.alloc(0)).equals(compressible));
  });
});

describe("GetTree", () => {
  const leaf = directoryBlob({
    files: [{ name: "f", digest: sha256("f"), isExecutable: false, nodeProperties: undefined }],
  });
  const shared = directoryBlob({ directories: [{ name: "leaf", digest: leaf.digest }] });
  const left = directoryBlob({ directories: [{ name: "s", digest: shared.digest }] });
  const root = directoryBlob({
    directories: [
      { name: "a", digest: left.digest },
      { name: "b", digest: shared.digest },
      { name: "c", digest: shared.digest },
    ],
  });

  before(async () => {
    await batchUpdate([leaf, shared, left, root]);
  });

  const getTree = (rootDigest: WireDigest, pageSize = 0, pageToken = "") =>
    collect(farm.clients.cas.getTree({ instanceName: "", rootDigest, pageSize, pageToken, digestFunction: 0 }));

  test("streams every distinct directory once, breadth first", async () => {
    const pages = await getTree(root.digest);
    const dirs = pages.flatMap((p) => p.directories);
    assert.deepEqual(dirs, [root.directory, left.directory, shared.directory, leaf.directory]);
    assert.equal(pages.at(-1)?.nextPageToken, "");
  });

  test("pages by page_size, and a page_token resumes where a page ended", async () => {
    const pages = await getTree(root.digest, 3);
    assert.deepEqual(
      pages.map((p) => p.directories.length),
      [3, 1],
    );
    const token = pages[0]?.nextPageToken ?? "";
    assert.notEqual(token, "");
    const rest = await getTree(root.digest, 3, token);
    assert.deepEqual(
      rest.flatMap((p) => p.directories),
      [leaf.directory],
    );
    await assert.rejects(getTree(root.digest, 3, "garbage"), /page_token/);
  });

  test("a missing root is NOT_FOUND; missing subtrees are left out", async () => {
    const absent = directoryBlob({
      files: [{ name: "zz", digest: sha256("zz"), isExecutable: true, nodeProperties: undefined }],
    });
    await assert.rejects(getTree(absent.digest), (err: ServiceError) => err.code === Code.NOT_FOUND);
    const partial = directoryBlob({ directories: [{ name: "gone", digest: absent.digest }] });
    await batchUpdate([partial]);
    assert.deepEqual(
      (await getTree(partial.digest)).flatMap((p) => p.directories),
      [partial.directory],
    );
  });

  test("directories with unsorted, duplicate or path-like names are INVALID_ARGUMENT naming the entry", async () => {
    const d = sha256("x");
    const file = (name: string) => ({ name, digest: d, isExecutable: false, nodeProperties: undefined });
    const cases: [ReturnType<typeof directoryBlob>, RegExp][] = [
      [directoryBlob({ files: [file("b"), file("a")] }), /files\[1\]\.name.*"a" is not sorted after "b"/],
      [directoryBlob({ files: [file("a/b")] }), /files\[0\]\.name.*contains "\/"/],
      [directoryBlob({ files: [file("..")] }), /files\[0\]\.name.*".." is not a valid name/],
      [directoryBlob({ files: [file(".")] }), /files\[0\]\.name/],
      [
        directoryBlob({ files: [file("x")], directories: [{ name: "x", digest: d }] }),
        /directories\[0\]\.name.*more than one/,
      ],
    ];
    for (const [bad, message] of cases) {
      await batchUpdate([bad]);
      await assert.rejects(getTree(bad.digest), (err: ServiceError) => {
        assert.equal(err.code, Code.INVALID_ARGUMENT);
        assert.match(err.details, message);
        return true;
      });
    }
  });
});
