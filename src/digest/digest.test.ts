import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Code, StatusError } from "../status/status.js";
import { digestOf, parseDigest, resolveDigestFunction, verifyBlob } from "./digest.js";
import { DIGEST_FUNCTIONS, digestFunctionByName, SHA256 } from "./functions.js";
import {
  formatReadResourceName,
  formatWriteResourceName,
  parseReadResourceName,
  parseWriteResourceName,
} from "./resource-name.js";

const HASH = "a".repeat(64);

function invalid(fn: () => unknown, field: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof StatusError);
    assert.equal(err.code, Code.INVALID_ARGUMENT);
    assert.match(err.message, field);
    return true;
  });
}

describe("digests", () => {
  test("known test vectors of every supported function", async () => {
    const expected: Record<string, string> = {
      sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
      sha1: "a9993e364706816aba3e25717850c26c9cd0d89d",
      md5: "900150983cd24fb0d6963f7d28e17f72",
      sha384: "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7",
      sha512:
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
      blake3: "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
    };
    for (const fn of DIGEST_FUNCTIONS) {
      const digest = await digestOf(fn, Buffer.from("abc"));
      assert.equal(digest.hash, expected[fn.name], fn.name);
      assert.equal(digest.hash.length, fn.hexLength);
    }
  });

  test("malformed digests name the field", () => {
    invalid(() => parseDigest(SHA256, { hash: "abc", sizeBytes: 1 }, "blob_digests[2]"), /blob_digests\[2\]\.hash.*64/);
    invalid(() => parseDigest(SHA256, { hash: "g".repeat(64), sizeBytes: 1 }, "d"), /d\.hash.*hexadecimal/);
    invalid(() => parseDigest(SHA256, { hash: "A".repeat(64), sizeBytes: 1 }, "d"), /d\.hash.*hexadecimal/);
    invalid(() => parseDigest(SHA256, { hash: HASH, sizeBytes: -1 }, "d"), /d\.size_bytes/);
    invalid(() => parseDigest(SHA256, undefined, "action_digest"), /action_digest: digest is missing/);
  });

  test("digest function from the request, or from the hash length for old clients", () => {
    assert.equal(resolveDigestFunction(9, HASH).name, "blake3");
    assert.equal(resolveDigestFunction(0, HASH).name, "sha256");
    assert.equal(resolveDigestFunction(0, "b".repeat(40)).name, "sha1");
    assert.equal(resolveDigestFunction(0, undefined).name, "sha256");
    invalid(() => resolveDigestFunction(4, HASH), /digest_function.*VSO.*not supported/);
    invalid(() => resolveDigestFunction(77, HASH), /digest_function.*77/);
    const unknownLength = "c".repeat(50);
    invalid(
      () => parseDigest(resolveDigestFunction(0, unknownLength), { hash: unknownLength, sizeBytes: 1 }, "d"),
      /d\.hash.*50/,
    );
  });

  test("verifyBlob refuses wrong sizes and wrong hashes", async () => {
    const good = await digestOf(SHA256, Buffer.from("hello"));
    await verifyBlob(good, Buffer.from("hello"), "data");
    await assert.rejects(verifyBlob(good, Buffer.from("hell"), "data"), /4 bytes were sent for a blob of 5/);
    await assert.rejects(verifyBlob(good, Buffer.from("hellO"), "data"), /sha256 is/);
  });
});

describe("resource names", () => {
  test("read names with and without instance name and digest-function segment", () => {
    const plain = parseReadResourceName(`blobs/${HASH}/12`);
    assert.deepEqual(
      [plain.instanceName, plain.digest.fn.name, plain.digest.sizeBytes, plain.compression],
      ["", "sha256", 12, "identity"],
    );
    const nested = parseReadResourceName(`team/a/b/blobs/${HASH}/12`);
    assert.equal(nested.instanceName, "team/a/b");
    const blake = parseReadResourceName(`main/blobs/blake3/${HASH}/3`);
    assert.deepEqual([blake.instanceName, blake.digest.fn.name], ["main", "blake3"]);
    const zstd = parseReadResourceName(`main/compressed-blobs/zstd/sha1/${"b".repeat(40)}/9`);
    assert.deepEqual([zstd.compression, zstd.digest.fn.name], ["zstd", "sha1"]);
  });

  test("write names carry the upload id and may end with metadata", () => {
    const w = parseWriteResourceName(`inst/uploads/0b7c-uuid/blobs/${HASH}/12/some/metadata`);
    assert.deepEqual([w.instanceName, w.uploadId, w.digest.sizeBytes], ["inst", "0b7c-uuid", 12]);
    const c = parseWriteResourceName(`uploads/u1/compressed-blobs/zstd/blake3/${HASH}/7`);
    assert.deepEqual([c.instanceName, c.compression, c.digest.fn.name], ["", "zstd", "blake3"]);
  });

  test("formatting round-trips", () => {
    const blake3 = digestFunctionByName("blake3");
    assert.ok(blake3);
    for (const fn of [SHA256, blake3]) {
      const digest = { fn, hash: HASH, sizeBytes: 5 };
      const read = parseReadResourceName(formatReadResourceName("x/y", digest, "zstd"));
      assert.deepEqual([read.instanceName, read.digest.fn, read.compression], ["x/y", fn, "zstd"]);
      const write = parseWriteResourceName(formatWriteResourceName("", "u", digest));
      assert.deepEqual([write.uploadId, write.digest.fn], ["u", fn]);
    }
  });

  test("malformed names are INVALID_ARGUMENT naming resource_name", () => {
    invalid(() => parseReadResourceName("nothing-here"), /resource_name/);
    invalid(() => parseReadResourceName(`blobs/${HASH}`), /lacks a hash and size/);
    invalid(() => parseReadResourceName(`blobs/${HASH}/-1`), /size "-1"/);
    invalid(() => parseReadResourceName(`blobs/${HASH}/12/extra`), /unexpected segments/);
    invalid(() => parseReadResourceName(`compressed-blobs/brotli/${HASH}/12`), /compressor "brotli"/);
    invalid(() => parseReadResourceName(`blobs/sha3/${HASH}/12`), /digest function "sha3"/);
    invalid(() => parseReadResourceName(`blobs/${"a".repeat(63)}/12`), /63 characters/);
    invalid(() => parseWriteResourceName(`blobs/${HASH}/12`), /uploads\/\{uuid\}/);
    invalid(() => parseWriteResourceName(`uploads//blobs/${HASH}/12`), /empty upload id/);
  });
});
