import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type TestExecutor, testExecutor } from "../../test/support/runner.js";
import { dir, encodeTree, file } from "../../test/support/trees.js";
import { digestKey, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Assignment, type Completion } from "../gen/berth/worker/v1/worker.js";
import {
  Action,
  type BatchUpdateBlobsRequest_Request,
  Command,
  DigestFunction_Value,
  Directory,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { PreconditionFailure } from "../gen/google/rpc/error_details.js";
import { Code } from "../status/status.js";
import { acceptAssignmentBlobs } from "./assignment-blobs.js";
import { DirectoryCache } from "./directory-cache.js";
import { RemoteCas } from "./remote-cas.js";

// The farm's CAS stays empty in these tests: whatever the worker lays out can only have come with the
// assignment, as the scheduler sends an input tree's Directory messages and small files.
let farm: TestFarm;
let cas: RemoteCas;
let workDir: string;
let executor: TestExecutor;

before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address);
  workDir = await mkdtemp(join(tmpdir(), "berth-assignment-blobs-"));
  await chmod(workDir, 0o755);
  executor = await testExecutor(workDir, cas, { workerName: "assignment-blobs-test" });
});
after(async () => {
  await executor?.trash.drain();
  cas?.close();
  await farm?.close();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

type Blob = { digest: WireDigest; data: Buffer };
const request = (blob: Blob): BatchUpdateBlobsRequest_Request => ({ ...blob, compressor: 0 });

function assignment(root: WireDigest, script: string, directories: Blob[], files: Blob[]): Assignment {
  return Assignment.fromPartial({
    leaseId: randomUUID(),
    digestFunction: DigestFunction_Value.SHA256,
    action: Action.fromPartial({ inputRootDigest: root }),
    command: Command.fromPartial({
      arguments: ["/bin/sh", "-c", script],
      environmentVariables: [{ name: "PATH", value: "/usr/bin:/bin" }],
    }),
    timeout: { seconds: 60, nanos: 0 },
    hostRoot: {},
    inputDirectories: directories.map(request),
    inputFiles: files.map(request),
  });
}

function inlineText(completion: Completion, digest: WireDigest | undefined): string {
  const blob = completion.inlineBlobs.find((b) => b.digest?.hash === digest?.hash);
  return blob ? Buffer.from(blob.data).toString() : "";
}

/** A tree of its own for each test (the worker's caches outlive a test), split into Directory messages and files. */
function uniqueTree(content: string) {
  const encoded = encodeTree(
    dir({ "bazel-out": dir({ bin: dir({ "in.txt": file(content), "tool.sh": file("echo tool\n", true) }) }) }),
  );
  const isFile = (b: Blob) => String(b.data) === content || String(b.data) === "echo tool\n";
  return {
    root: encoded.root,
    directories: encoded.blobs.filter((b) => !isFile(b)),
    files: encoded.blobs.filter(isFile),
  };
}

describe("input blobs that come with an assignment", () => {
  test("a worker lays out an input root the CAS has none of from the assignment alone", async () => {
    const content = `inline input ${randomUUID()}\n`;
    const tree = uniqueTree(content);
    assert.equal(tree.directories.length, 3);
    const completion = await executor.run(
      assignment(tree.root, "cat bazel-out/bin/in.txt; sh bazel-out/bin/tool.sh", tree.directories, tree.files),
    );
    assert.equal(completion.status?.code, Code.OK, completion.status?.message);
    assert.equal(completion.result?.exitCode, 0, inlineText(completion, completion.result?.stderrDigest));
    assert.equal(inlineText(completion, completion.result?.stdoutDigest), `${content}tool\n`);
  });

  test("a file whose bytes do not match its digest is not used: with the CAS lacking it, it is MISSING", async () => {
    const content = `genuine ${randomUUID()}\n`;
    const tree = uniqueTree(content);
    const genuine = tree.files.find((b) => String(b.data) === content) as Blob;
    const tampered = tree.files.map((b) => (b === genuine ? { ...b, data: Buffer.from("tampered\n") } : b));
    const completion = await executor.run(
      assignment(tree.root, "cat bazel-out/bin/in.txt", tree.directories, tampered),
    );
    assert.equal(completion.status?.code, Code.FAILED_PRECONDITION, completion.status?.message);
    const detail = completion.status?.details.find((d) => d.typeUrl.endsWith("PreconditionFailure"));
    const violations = PreconditionFailure.decode(detail?.value ?? Buffer.alloc(0)).violations;
    assert.deepEqual(
      violations.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${genuine.digest.hash}/${genuine.digest.sizeBytes}`]],
    );
  });

  test("a file the worker holds already is taken from its cache, whatever bytes came under its digest", async () => {
    const content = `held ${randomUUID()}\n`;
    const tree = uniqueTree(content);
    const script = "cat bazel-out/bin/in.txt";
    const first = await executor.run(assignment(tree.root, script, tree.directories, tree.files));
    assert.equal(inlineText(first, first.result?.stdoutDigest), content);
    // The same digest again, its bytes forged: the cached copy is laid out, the forged bytes are never written.
    const genuine = tree.files.find((b) => String(b.data) === content) as Blob;
    const forged = tree.files.map((b) => (b === genuine ? { ...b, data: Buffer.from("forged\n") } : b));
    const second = await executor.run(assignment(tree.root, script, tree.directories, forged));
    assert.equal(second.status?.code, Code.OK, second.status?.message);
    assert.equal(inlineText(second, second.result?.stdoutDigest), content);
  });

  test("Directory messages that do not match their digest or break REAPI's rules stay out of the worker's cache", async () => {
    const good = encodeTree(dir({ ok: file("ok\n") }));
    const bad = encodeTree(dir({ other: file("other\n") }));
    const goodDirectory = good.blobs.find((b) => b.digest.hash === good.root.hash) as Blob;
    const badDirectory = bad.blobs.find((b) => b.digest.hash === bad.root.hash) as Blob;
    // A Directory whose entries are out of order (REAPI requires them sorted) under its true digest.
    const unsorted = encodeTree(dir({ a: file("a"), b: file("b") }));
    const unsortedRoot = unsorted.blobs.find((b) => b.digest.hash === unsorted.root.hash) as Blob;
    const swapped = Directory.decode(unsortedRoot.data);
    swapped.files.reverse();
    const swappedData = Buffer.from(Directory.encode(swapped).finish());
    const directories = new DirectoryCache();
    const files = await acceptAssignmentBlobs(
      SHA256,
      {
        inputDirectories: [
          request(goodDirectory),
          request({ digest: badDirectory.digest, data: goodDirectory.data }),
          request({ digest: sha256(swappedData), data: swappedData }),
        ],
        inputFiles: [request({ digest: sha256("x"), data: Buffer.from("y") })],
      },
      directories,
    );
    const key = (d: WireDigest) => digestKey(parseDigest(SHA256, d, "test"));
    assert.ok(directories.get(key(good.root)), "the genuine Directory is taken in");
    assert.equal(directories.get(key(bad.root)), undefined, "bytes of another Directory under its digest");
    assert.equal(directories.get(key(sha256(swappedData))), undefined, "entries out of order");
    assert.equal(
      await files.get(parseDigest(SHA256, sha256("x"), "test")),
      undefined,
      "a file whose bytes do not match",
    );
  });
});
