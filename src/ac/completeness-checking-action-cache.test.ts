import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DiskBlobStore } from "../cas/disk-blob-store.js";
import { type Digest, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { ActionResult, Directory, Tree } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { LruDirectory } from "../store/lru-directory.js";
import { CompletenessCheckingActionCache } from "./completeness-checking-action-cache.js";
import { DiskActionCache } from "./disk-action-cache.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-ac-"));
});
after(() => rm(root, { recursive: true, force: true }));

const wire = (d: Digest) => ({ hash: d.hash, sizeBytes: d.sizeBytes });

test("a result is a hit only while every blob it names, down to files inside trees, is stored", async () => {
  const cas = await DiskBlobStore.open(join(root, "cas"), { maxBytes: 1 << 20 });
  const ac = new CompletenessCheckingActionCache(
    new DiskActionCache(await LruDirectory.open(join(root, "ac"), { maxBytes: 1 << 20 })),
    cas,
  );
  const store = async (text: string | Buffer) => {
    const data = Buffer.from(text);
    const digest = await digestOf(SHA256, data);
    await cas.put(digest, data);
    return digest;
  };
  const parts: Record<string, Digest> = {
    file: await store("output file"),
    stdout: await store("stdout"),
    stderr: await store("stderr"),
    nested: await store("file inside an output directory"),
  };
  const tree = Tree.fromPartial({
    root: Directory.fromPartial({ directories: [{ name: "sub", digest: wire(parts.nested as Digest) }] }),
    children: [Directory.fromPartial({ files: [{ name: "n", digest: wire(parts.nested as Digest) }] })],
  });
  parts.tree = await store(Buffer.from(Tree.encode(tree).finish()));
  const result = ActionResult.fromPartial({
    outputFiles: [{ path: "f", digest: wire(parts.file as Digest) }],
    outputDirectories: [{ path: "d", treeDigest: wire(parts.tree as Digest) }],
    stdoutDigest: wire(parts.stdout as Digest),
    stderrDigest: wire(parts.stderr as Digest),
  });

  for (const [name, digest] of Object.entries(parts)) {
    const action = await digestOf(SHA256, Buffer.from(`action losing ${name}`));
    await ac.put("", action, result);
    assert.ok(await ac.get("", action), `complete before losing ${name}`);
    await cas.remove(digest);
    assert.equal(await ac.get("", action), undefined, `a miss after losing ${name}`);
    await cas.put(digest, name === "tree" ? Buffer.from(Tree.encode(tree).finish()) : Buffer.from(textOf(name)));
  }
});

function textOf(name: string): string {
  return (
    { file: "output file", stdout: "stdout", stderr: "stderr", nested: "file inside an output directory" }[name] ?? ""
  );
}
