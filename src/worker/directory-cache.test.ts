import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { directoryBlob, sha256 } from "../../test/support/blobs.js";
import { digestKey, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { acceptAssignmentBlobs } from "./assignment-blobs.js";
import { DirectoryCache } from "./directory-cache.js";

const FILE = Buffer.from("f\n");

/** A valid Directory of about `bytes` bytes: one file whose node properties carry the padding. */
function paddedDirectory(bytes: number, tag: string) {
  return directoryBlob({
    files: [
      {
        name: "f",
        digest: sha256(FILE),
        isExecutable: false,
        nodeProperties: {
          properties: [{ name: tag, value: "x".repeat(bytes) }],
          mtime: undefined,
          unixMode: undefined,
        },
      },
    ],
  });
}

const request = (blob: { digest: { hash: string; sizeBytes: number }; data: Buffer }) => ({
  digest: blob.digest,
  data: blob.data,
  compressor: 0,
});
const key = (blob: { digest: { hash: string; sizeBytes: number } }) =>
  digestKey(parseDigest(SHA256, blob.digest, "test"));

describe("a worker's cache of Directory messages", () => {
  test("holds no more than its byte cap, whatever the size of the Directory messages assignments bring", async () => {
    const cap = 4 * 1024 * 1024;
    const cache = new DirectoryCache(cap);
    // 100 directories of 200 KB: each over a sixteenth of the cache once decoded, so none is kept.
    const large = Array.from({ length: 100 }, (_, i) => paddedDirectory(200_000, `large${i}`));
    await acceptAssignmentBlobs(SHA256, { inputDirectories: large.map(request), inputFiles: [] }, cache);
    assert.equal(cache.size, 0);
    // 200 directories of 20 KB (~80 KB each decoded, 16 MB together): the oldest are forgotten.
    const medium = Array.from({ length: 200 }, (_, i) => paddedDirectory(20_000, `medium${i}`));
    for (const blob of medium) {
      await acceptAssignmentBlobs(SHA256, { inputDirectories: [request(blob)], inputFiles: [] }, cache);
      assert.ok(cache.bytes <= cap, `${cache.bytes} bytes held`);
    }
    assert.ok(cache.bytes > cap / 2, `only ${cache.bytes} bytes held`);
    assert.ok(cache.size > 10 && cache.size < 200, `${cache.size} held`);
    assert.equal(cache.get(key(medium[0] as (typeof medium)[number])), undefined, "the oldest is forgotten");
    const newest = cache.get(key(medium[199] as (typeof medium)[number]));
    assert.deepEqual(newest, Directory.decode((medium[199] as (typeof medium)[number]).data));
  });

  test("a Directory over inputLimits.maxDirectoryBytes that comes with an assignment is not taken in", async () => {
    const cache = new DirectoryCache();
    const small = paddedDirectory(1_000, "small");
    const big = paddedDirectory(2 * 1024 * 1024, "big");
    await acceptAssignmentBlobs(
      SHA256,
      { inputDirectories: [request(small), request(big)], inputFiles: [] },
      cache,
      1024 * 1024,
    );
    assert.ok(cache.get(key(small)), "the small one is taken in");
    assert.equal(cache.get(key(big)), undefined, "the one over the limit is left to the CAS, where it is refused");
  });
});
