import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { WireDigest } from "../../test/support/blobs.js";
import { dir, encodeTree, file } from "../../test/support/trees.js";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { openTestCas } from "../expand/test-cas.js";
import { inputTreeBlobs } from "./input-blobs.js";

let tempDir: string;
let cas: BlobStore;

before(async () => {
  tempDir = await mkdtemp(join(tmpdir(), "berth-input-blobs-"));
  cas = (await openTestCas(tempDir)).cas;
});
after(async () => {
  if (tempDir) await rm(tempDir, { recursive: true, force: true });
});

const digest = (wire: WireDigest): Digest => parseDigest(SHA256, wire, "test");
const keys = (blobs: { digest: Digest }[]) => blobs.map((b) => `${b.digest.hash}/${b.digest.sizeBytes}`).sort();
const wireKeys = (blobs: { digest: WireDigest }[]) => blobs.map((b) => `${b.digest.hash}/${b.digest.sizeBytes}`).sort();

/** Stores every blob of the tree except those `skip` names; returns the tree's encoding. */
async function store(tree: ReturnType<typeof dir>, skip: (data: Buffer) => boolean = () => false) {
  const encoded = encodeTree(tree);
  for (const blob of encoded.blobs) if (!skip(blob.data)) await cas.put(digest(blob.digest), blob.data);
  return encoded;
}

describe("the input tree blobs an assignment carries", () => {
  test("a small tree comes whole: every Directory message and every small file, each verified bytes", async () => {
    const tree = dir({
      "bazel-out": dir({ bin: dir({ "s0.txt": file("step 0\n"), "tool.sh": file("#!/bin/sh\n", true) }) }),
      src: dir({ "a.c": file("int a;\n"), "copy.c": file("int a;\n") }),
    });
    const encoded = await store(tree);
    const { directories, files } = await inputTreeBlobs(SHA256, cas, digest(encoded.root));
    const fileBlobs = encoded.blobs.filter((b) => ["step 0\n", "#!/bin/sh\n", "int a;\n"].includes(String(b.data)));
    assert.deepEqual(keys(files), wireKeys(fileBlobs), "each distinct file once");
    assert.equal(directories.length, 4, "root, bazel-out, bazel-out/bin and src");
    assert.equal(
      `${directories[0]?.digest.hash}/${directories[0]?.digest.sizeBytes}`,
      `${encoded.root.hash}/${encoded.root.sizeBytes}`,
    );
    for (const blob of [...directories, ...files]) {
      const original = encoded.blobs.find((b) => b.digest.hash === blob.digest.hash);
      assert.deepEqual(blob.data, original?.data);
    }
  });

  test("large files and blobs the CAS lacks are left out, not reported", async () => {
    const big = Buffer.alloc(20 * 1024, 7);
    const tree = dir({
      big: file(big),
      small: file("small\n"),
      gone: file("never uploaded\n"),
      sub: dir({ x: file("x") }),
    });
    const encoded = await store(tree, (data) => String(data) === "never uploaded\n" || data.byteLength === 1);
    const { directories, files } = await inputTreeBlobs(SHA256, cas, digest(encoded.root));
    assert.deepEqual(
      files.map((f) => String(f.data)),
      ["small\n"],
      "the 20 KiB file is over the 16 KiB limit; the missing one and the missing x are skipped",
    );
    assert.equal(directories.length, 2);
  });

  test("the limits bound directories (breadth first from the root) and bytes", async () => {
    const tree = dir({
      a: dir({ deep: dir({ deeper: dir({ f: file("deep file\n") }) }) }),
      b: dir({ g: file("b's file\n") }),
    });
    const encoded = await store(tree);
    const root = digest(encoded.root);
    const three = await inputTreeBlobs(SHA256, cas, root, {
      maxDirectories: 3,
      maxFileBytes: 1024,
      maxTotalBytes: 1 << 20,
    });
    assert.equal(three.directories.length, 3, "the root, then a and b");
    assert.deepEqual(
      three.files.map((f) => String(f.data)),
      ["b's file\n"],
      "only files of the directories sent",
    );

    const tight = await inputTreeBlobs(SHA256, cas, root, {
      maxDirectories: 100,
      maxFileBytes: 1024,
      maxTotalBytes: 0,
    });
    assert.deepEqual([tight.directories.length, tight.files.length], [0, 0]);
  });

  test("a root the CAS lacks gives nothing", async () => {
    const encoded = encodeTree(dir({ only: file("not stored\n") }));
    const { directories, files } = await inputTreeBlobs(SHA256, cas, digest(encoded.root));
    assert.deepEqual([directories.length, files.length], [0, 0]);
  });
});
