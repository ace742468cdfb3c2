import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import type { ServiceError } from "@grpc/grpc-js";
import { blake3 } from "hash-wasm";
import { compress, decompress } from "zstd-napi";
import { randomBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import type { WriteRequest, WriteResponse } from "../gen/google/bytestream/bytestream.js";
import { Code } from "../status/status.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm({ instanceNames: ["", "team/linux"] });
});
after(() => farm.close());

const blobName = (d: WireDigest, prefix = "") => `${prefix}blobs/${d.hash}/${d.sizeBytes}`;
const uploadName = (d: WireDigest, prefix = "", kind = "blobs") =>
  `${prefix}uploads/${randomUUID()}/${kind}/${d.hash}/${d.sizeBytes}`;

/** Sends `data` in chunks on one Write stream, starting at `offset`. */
function write(
  resourceName: string,
  data: Buffer,
  options: { chunk?: number; offset?: number; finish?: boolean } = {},
): Promise<WriteResponse> {
  const { chunk = 64 * 1024, offset = 0, finish = true } = options;
  return new Promise((resolve, reject) => {
    const call = farm.clients.byteStream.write((err, res) => (err ? reject(err) : resolve(res)));
    let at = 0;
    do {
      const piece = data.subarray(at, at + chunk);
      const last = at + piece.byteLength >= data.byteLength;
      call.write({
        resourceName: at === 0 ? resourceName : "",
        writeOffset: offset + at,
        finishWrite: finish && last,
        data: piece,
      });
      at += piece.byteLength;
    } while (at < data.byteLength);
    call.end();
  });
}

async function read(resourceName: string, readOffset = 0, readLimit = 0): Promise<Buffer> {
  const responses = await collect(farm.clients.byteStream.read({ resourceName, readOffset, readLimit }));
  return Buffer.concat(responses.map((r) => r.data));
}

const queryWriteStatus = (resourceName: string) =>
  unaryCall(farm.clients.byteStream.queryWriteStatus.bind(farm.clients.byteStream), { resourceName });

function failsWith(code: number, message: RegExp) {
  return (err: ServiceError) => {
    assert.equal(err.code, code, err.details);
    assert.match(err.details, message);
    return true;
  };
}

describe("ByteStream Write and Read", () => {
  test("a blob written in chunks reads back whole and in ranges", async () => {
    const { data, digest } = randomBlob(3 * 1024 * 1024 + 17);
    const response = await write(uploadName(digest), data);
    assert.equal(response.committedSize, data.byteLength);
    assert.ok((await read(blobName(digest))).equals(data));
    assert.ok((await read(blobName(digest), 1000, 5000)).equals(data.subarray(1000, 6000)));
    assert.ok((await read(blobName(digest), data.byteLength - 3)).equals(data.subarray(-3)));
    assert.equal((await read(blobName(digest), data.byteLength)).byteLength, 0);
  });

  test("instance names and the digest-function segment address separate blobs", async () => {
    const data = randomBlob(5000).data;
    const hash = await blake3(data);
    const name = `team/linux/uploads/${randomUUID()}/blobs/blake3/${hash}/${data.byteLength}`;
    await write(name, data);
    assert.ok((await read(`team/linux/blobs/blake3/${hash}/${data.byteLength}`)).equals(data));
    await assert.rejects(
      read(`team/linux/blobs/${hash}/${data.byteLength}`),
      failsWith(Code.NOT_FOUND, /not in the CAS/),
    );
    await assert.rejects(
      read(`team/mac/blobs/blake3/${hash}/${data.byteLength}`),
      failsWith(Code.INVALID_ARGUMENT, /unknown instance name "team\/mac"/),
    );
  });

  test("bad reads get precise statuses", async () => {
    const { data, digest } = randomBlob(100);
    await write(uploadName(digest), data);
    await assert.rejects(read(blobName(digest), 101), failsWith(Code.OUT_OF_RANGE, /read_offset 101 is past the end/));
    await assert.rejects(read(blobName(digest), -1), failsWith(Code.INVALID_ARGUMENT, /read_offset/));
    await assert.rejects(read(blobName(digest), 0, -1), failsWith(Code.INVALID_ARGUMENT, /read_limit/));
    await assert.rejects(read(blobName(randomBlob(10).digest)), failsWith(Code.NOT_FOUND, /is not in the CAS/));
    await assert.rejects(read("blobs/123/4"), failsWith(Code.INVALID_ARGUMENT, /resource_name/));
    await assert.rejects(
      read(`compressed-blobs/zstd/${digest.hash}/100`, 0, 10),
      failsWith(Code.INVALID_ARGUMENT, /read_limit/),
    );
  });

  test("data that does not match the digest is refused and not stored", async () => {
    const { digest } = randomBlob(1000);
    const name = uploadName(digest);
    await assert.rejects(write(name, randomBlob(1000).data), failsWith(Code.INVALID_ARGUMENT, /sha256 is/));
    await assert.rejects(
      write(uploadName(digest), randomBlob(2000).data),
      failsWith(Code.INVALID_ARGUMENT, /more than 1000 bytes/),
    );
    await assert.rejects(read(blobName(digest)), failsWith(Code.NOT_FOUND, /not in the CAS/));
    assert.deepEqual(await queryWriteStatus(name), { committedSize: 0, complete: false });
  });

  test("an interrupted upload resumes from the size QueryWriteStatus reports", async () => {
    const { data, digest } = randomBlob(2 * 1024 * 1024);
    const name = uploadName(digest);
    const half = 1024 * 1024;
    const call = farm.clients.byteStream.write(() => {});
    call.on("error", () => {});
    for (let at = 0; at < half; at += 256 * 1024) {
      call.write({
        resourceName: at === 0 ? name : "",
        writeOffset: at,
        finishWrite: false,
        data: data.subarray(at, at + 256 * 1024),
      });
    }
    for (let i = 0; i < 200 && (await queryWriteStatus(name)).committedSize < half; i++) await sleep(10);
    call.cancel(); // the client's connection breaks mid-upload
    await sleep(50);
    assert.deepEqual(await queryWriteStatus(name), { committedSize: half, complete: false });

    await assert.rejects(
      write(name, data.subarray(half + 10), { offset: half + 10 }),
      failsWith(Code.INVALID_ARGUMENT, /write_offset.*1048576 bytes committed/),
    );
    const resumed = await write(name, data.subarray(half), { offset: half });
    assert.equal(resumed.committedSize, data.byteLength);
    assert.deepEqual(await queryWriteStatus(name), { committedSize: data.byteLength, complete: true });
    assert.ok((await read(blobName(digest))).equals(data));
  });

  test("a stream that ends without finish_write keeps its data for a retry", async () => {
    const { data, digest } = randomBlob(4096);
    const name = uploadName(digest);
    await assert.rejects(
      write(name, data.subarray(0, 1000), { finish: false }),
      failsWith(Code.INVALID_ARGUMENT, /finish_write/),
    );
    assert.equal((await queryWriteStatus(name)).committedSize, 1000);
    await write(name, data.subarray(1000), { offset: 1000 });
    assert.ok((await read(blobName(digest))).equals(data));
  });

  test("writing a blob that is already stored finishes at once with its size", async () => {
    const { data, digest } = randomBlob(300_000);
    await write(uploadName(digest), data);
    // Only the first piece is sent and the stream is never finished: the server must answer anyway.
    const response = await new Promise<WriteResponse>((resolve, reject) => {
      const call = farm.clients.byteStream.write((err, res) => (err ? reject(err) : resolve(res)));
      call.write({
        resourceName: uploadName(digest),
        writeOffset: 0,
        finishWrite: false,
        data: data.subarray(0, 1000),
      });
    });
    assert.equal(response.committedSize, data.byteLength);
  });

  test("concurrent uploads of the same blob all succeed and store it once", async () => {
    const { data, digest } = randomBlob(1024 * 1024 + 3);
    const responses = await Promise.all(
      Array.from({ length: 6 }, () => write(uploadName(digest), data, { chunk: 32 * 1024 })),
    );
    for (const r of responses) assert.equal(r.committedSize, data.byteLength);
    assert.ok((await read(blobName(digest))).equals(data));
    const dir = join(farm.config.dataDir, "cas", "files", "sha256", digest.hash.slice(0, 2));
    assert.deepEqual(
      (await readdir(dir)).filter((f) => f.startsWith(digest.hash)),
      [`${digest.hash}-${digest.sizeBytes}`],
    );
    assert.deepEqual(await readdir(join(farm.config.dataDir, "cas", "tmp")), []);
  });

  test("malformed resource names and offsets are INVALID_ARGUMENT", async () => {
    const { data, digest } = randomBlob(10);
    await assert.rejects(write(blobName(digest), data), failsWith(Code.INVALID_ARGUMENT, /uploads\/\{uuid\}/));
    await assert.rejects(write(`uploads/u/blobs/${digest.hash}/x`, data), failsWith(Code.INVALID_ARGUMENT, /size "x"/));
    await assert.rejects(
      write(uploadName(digest), data, { offset: 5 }),
      failsWith(Code.INVALID_ARGUMENT, /write_offset 5/),
    );
    await assert.rejects(queryWriteStatus("nonsense"), failsWith(Code.INVALID_ARGUMENT, /resource_name/));
  });
});

describe("compressed-blobs/zstd", () => {
  test("a zstd upload is verified uncompressed and can be read compressed or plain", async () => {
    const data = Buffer.alloc(2_000_000, "compressible text ");
    const digest = sha256(data);
    const compressed = compress(data);
    const response = await write(uploadName(digest, "", "compressed-blobs/zstd"), compressed, { chunk: 10_000 });
    assert.equal(response.committedSize, compressed.byteLength);
    assert.ok((await read(blobName(digest))).equals(data));
    const viaZstd = await read(`compressed-blobs/zstd/${digest.hash}/${digest.sizeBytes}`);
    assert.ok(viaZstd.byteLength < data.byteLength / 10);
    assert.ok(decompress(viaZstd).equals(data));
    const fromOffset = await read(`compressed-blobs/zstd/${digest.hash}/${digest.sizeBytes}`, 1_500_000);
    assert.ok(decompress(fromOffset).equals(data.subarray(1_500_000)));
    // Already stored: the protocol's early answer for compressed uploads is -1.
    const again = await write(uploadName(digest, "", "compressed-blobs/zstd"), compressed);
    assert.equal(again.committedSize, -1);
  });

  test("zstd data that decompresses to other bytes, or is not zstd, is refused", async () => {
    const { digest } = randomBlob(5000);
    await assert.rejects(
      write(uploadName(digest, "", "compressed-blobs/zstd"), compress(randomBlob(5000).data)),
      failsWith(Code.INVALID_ARGUMENT, /sha256 is/),
    );
    await assert.rejects(
      write(uploadName(digest, "", "compressed-blobs/zstd"), Buffer.from("plain text, not a zstd frame")),
      failsWith(Code.INVALID_ARGUMENT, /zstd/),
    );
    await assert.rejects(
      write(uploadName(digest, "", "compressed-blobs/zstd"), compress(Buffer.alloc(100_000))),
      failsWith(Code.INVALID_ARGUMENT, /more than 5000 bytes/),
    );
    await assert.rejects(read(blobName(digest)), failsWith(Code.NOT_FOUND, /not in the CAS/));
  });
});

describe("the empty blob", () => {
  test("is always readable and never needs uploading", async () => {
    const empty = sha256(Buffer.alloc(0));
    assert.equal((await read(blobName(empty))).byteLength, 0);
    assert.deepEqual(await queryWriteStatus(uploadName(empty)), { committedSize: 0, complete: true });
    const request: WriteRequest = {
      resourceName: uploadName(empty),
      writeOffset: 0,
      finishWrite: true,
      data: Buffer.alloc(0),
    };
    assert.equal((await write(request.resourceName, Buffer.alloc(0))).committedSize, 0);
  });
});
