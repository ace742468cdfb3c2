import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction, uploadBlobs } from "../../test/support/actions.js";
import { directoryBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { type Clients, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { Action, Command, type Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { silentLogger } from "../log/log.js";
import { Code } from "../status/status.js";
import { startWorkers } from "../worker/local-workers.js";

interface Blob {
  digest: WireDigest;
  data: Buffer;
}

/** Uploads `blobs` (in batches that fit a request), a command and an action on `root`; returns the action digest. */
async function uploadRawAction(
  clients: Clients,
  root: WireDigest,
  blobs: Blob[],
  command: Partial<Command> = { arguments: ["true"] },
  salt = "",
): Promise<WireDigest> {
  for (let at = 0; at < blobs.length; ) {
    const batch: Blob[] = [];
    let bytes = 0;
    while (at < blobs.length && bytes < 2 * 1024 * 1024) {
      const blob = blobs[at++] as Blob;
      batch.push(blob);
      bytes += blob.data.byteLength + 100;
    }
    await uploadBlobs(clients, batch);
  }
  const commandData = Buffer.from(Command.encode(Command.fromPartial(command)).finish());
  const actionData = Buffer.from(
    Action.encode(
      Action.fromPartial({ commandDigest: sha256(commandData), inputRootDigest: root, salt: Buffer.from(salt) }),
    ).finish(),
  );
  await uploadBlobs(clients, [
    { digest: sha256(commandData), data: commandData },
    { digest: sha256(actionData), data: actionData },
  ]);
  return sha256(actionData);
}

const FILE = Buffer.from("leaf\n");

/** 23 Directory messages: each names the one below twice, so the tree expands to 2^22 directories. */
function dagBomb(levels = 22): { root: WireDigest; blobs: Blob[] } {
  const blobs: Blob[] = [{ digest: sha256(FILE), data: FILE }];
  let below = directoryBlob({
    files: [{ name: "f", digest: sha256(FILE), isExecutable: false, nodeProperties: undefined }],
  });
  blobs.push(below);
  for (let i = 0; i < levels; i++) {
    below = directoryBlob({
      directories: [
        { name: "a", digest: below.digest },
        { name: "b", digest: below.digest },
      ],
    });
    blobs.push(below);
  }
  return { root: below.digest, blobs };
}

/** A chain of `levels` directories, each holding the next under `name`. */
function deepTree(levels: number, name = "d"): { root: WireDigest; blobs: Blob[] } {
  const blobs: Blob[] = [{ digest: sha256(FILE), data: FILE }];
  let below = directoryBlob({
    files: [{ name: "f", digest: sha256(FILE), isExecutable: false, nodeProperties: undefined }],
  });
  blobs.push(below);
  for (let i = 0; i < levels; i++) {
    below = directoryBlob({ directories: [{ name, digest: below.digest }] });
    blobs.push(below);
  }
  return { root: below.digest, blobs };
}

/** One directory of `count` distinct files. */
function wideTree(count: number): { root: WireDigest; blobs: Blob[] } {
  const blobs: Blob[] = [];
  const files: Directory["files"] = [];
  const names = Array.from({ length: count }, (_, i) => `f${String(i).padStart(7, "0")}`);
  for (const name of names) {
    const data = Buffer.from(name);
    blobs.push({ digest: sha256(data), data });
    files.push({ name, digest: sha256(data), isExecutable: false, nodeProperties: undefined });
  }
  const root = directoryBlob({ files });
  blobs.push(root);
  return { root: root.digest, blobs };
}

async function runEcho(clients: Clients, word: string): Promise<void> {
  const digest = await uploadAction(clients, { args: ["/bin/sh", "-c", `echo ${word}`], salt: word });
  const { response } = await execute(clients, digest, { skipCacheLookup: true });
  assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
  assert.equal(await readBlob(clients, response.result?.stdoutDigest), `${word}\n`);
}

describe("input trees are checked at Execute, before anything is queued", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
  });
  after(() => farm.close());

  test("a DAG of 23 Directory messages expanding to millions of entries is refused at once, naming the limit", async () => {
    const { root, blobs } = dagBomb();
    const digest = await uploadRawAction(farm.clients, root, blobs);
    const started = performance.now();
    const { response, updates } = await execute(farm.clients, digest);
    const elapsed = performance.now() - started;
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /execution\.inputLimits\.maxEntries/);
    assert.match(response.status?.message ?? "", /limit of 1000000/);
    const { preconditionFailure } = unpackDetails(response.status as never);
    assert.equal(preconditionFailure?.violations[0]?.subject, "execution.inputLimits.maxEntries");
    // Never queued, never sent to a worker.
    assert.ok(!updates.some((u) => u.stage === 2 || u.stage === 3), "the action was queued");
    assert.ok(elapsed < 2000, `took ${elapsed} ms`);
    await runEcho(farm.clients, "after-bomb");
  });

  test("a tree 10,000 directories deep is refused naming the depth limit, without overflowing a stack", async () => {
    const { root, blobs } = deepTree(10_000);
    const digest = await uploadRawAction(farm.clients, root, blobs);
    const { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /more than 256 directories deep.*execution\.inputLimits\.maxDepth/);
    await runEcho(farm.clients, "after-deep");
  });

  test("a tree just inside the depth limit runs", async () => {
    const { root, blobs } = deepTree(200, "x");
    const path = Array.from({ length: 200 }, () => "x").join("/");
    const digest = await uploadRawAction(farm.clients, root, blobs, { arguments: ["/bin/cat", `${path}/f`] });
    const { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
    assert.equal(response.result?.exitCode, 0);
    assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "leaf\n");
  });

  test("names a Directory may not hold are INVALID_ARGUMENT naming the directory and the name", async () => {
    const file = { digest: sha256(FILE), isExecutable: false, nodeProperties: undefined };
    const cases: [string, Partial<Directory>, RegExp][] = [
      ["dot-dot", { files: [{ name: "..", ...file }] }, /"\.\." is not a valid name/],
      ["slash", { files: [{ name: "a/b", ...file }] }, /"a\/b" contains "\/"/],
      ["empty", { files: [{ name: "", ...file }] }, /"" is not a valid name/],
      ["nul", { files: [{ name: "a\0b", ...file }] }, /NUL/],
      [
        "unsorted",
        {
          files: [
            { name: "b", ...file },
            { name: "a", ...file },
          ],
        },
        /not sorted/,
      ],
      ["too long", { files: [{ name: "n".repeat(300), ...file }] }, /longer than 255 bytes/],
    ];
    for (const [label, bad, message] of cases) {
      const inner = directoryBlob(bad);
      const root = directoryBlob({ directories: [{ name: "sub", digest: inner.digest }] });
      const digest = await uploadRawAction(
        farm.clients,
        root.digest,
        [{ digest: sha256(FILE), data: FILE }, inner, root],
        { arguments: ["true"] },
        label,
      );
      const { response } = await execute(farm.clients, digest);
      assert.equal(response.status?.code, Code.INVALID_ARGUMENT, `${label}: ${response.status?.message}`);
      assert.match(response.status?.message ?? "", /input directory "sub"/, label);
      assert.match(response.status?.message ?? "", message, label);
    }
  });

  test("a path longer than the farm lays out is INVALID_ARGUMENT naming the path, not ENAMETOOLONG", async () => {
    const { root, blobs } = deepTree(14, "y".repeat(250));
    const digest = await uploadRawAction(farm.clients, root, blobs);
    const { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(
      response.status?.message ?? "",
      /input path y+…y+\/f: is 3515 bytes long; this farm lays out paths of at most 3072 bytes/,
    );
  });

  test("a missing Directory below the root is FAILED_PRECONDITION with a MISSING violation", async () => {
    const absent = directoryBlob({
      files: [{ name: "gone", digest: sha256("never uploaded"), isExecutable: false, nodeProperties: undefined }],
    });
    const root = directoryBlob({ directories: [{ name: "sub", digest: absent.digest }] });
    const digest = await uploadRawAction(farm.clients, root.digest, [root]);
    const { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    const { preconditionFailure } = unpackDetails(response.status as never);
    assert.deepEqual(
      preconditionFailure?.violations.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${absent.digest.hash}/${absent.digest.sizeBytes}`]],
    );
  });

  test("commands no program could be given are INVALID_ARGUMENT naming the field", async () => {
    const cases: [Partial<Command>, RegExp][] = [
      [
        { arguments: ["true"], environmentVariables: [{ name: "A=B", value: "x" }] },
        /command\.environment_variables\[0\]\.name: "A=B" contains "="/,
      ],
      [
        {
          arguments: ["true"],
          environmentVariables: [
            { name: "OK", value: "1" },
            { name: "", value: "x" },
          ],
        },
        /command\.environment_variables\[1\]\.name: is empty/,
      ],
      [
        { arguments: ["true"], environmentVariables: [{ name: "V", value: "a\0b" }] },
        /command\.environment_variables\[0\]\.value.*NUL/,
      ],
      [{ arguments: ["/bin/echo", "a\0b"] }, /command\.arguments\[1\]: contains a NUL byte/],
      [{ arguments: ["true"], outputPaths: ["o".repeat(5000)] }, /command\.output_paths\[0\]: is 5000 bytes long/],
      [{ arguments: ["true"], workingDirectory: "w".repeat(300) }, /command\.working_directory: .*255 bytes/],
    ];
    const empty = directoryBlob({});
    for (const [command, message] of cases) {
      const digest = await uploadRawAction(farm.clients, empty.digest, [empty], command);
      const { response } = await execute(farm.clients, digest);
      assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
      assert.match(response.status?.message ?? "", message);
      const { badRequest } = unpackDetails(response.status as never);
      assert.ok(badRequest?.fieldViolations[0]?.field.startsWith("command."), "the field is named in BadRequest");
    }
    await runEcho(farm.clients, "after-commands");
  });
});

describe("configured input limits", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm(
      { execution: { inputLimits: { maxEntries: 500, maxTotalBytes: "1KiB", maxDirectoryBlobs: 50 } } },
      undefined,
      { workers: 1, runImages: false },
    );
  });
  after(() => farm.close());

  test("a wide tree past maxEntries, a tree past maxTotalBytes and one past maxDirectoryBlobs are refused naming the key", async () => {
    const wide = wideTree(501);
    let digest = await uploadRawAction(farm.clients, wide.root, wide.blobs);
    let { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(
      response.status?.message ?? "",
      /has more than 500 entries.*limit of 500 \(execution\.inputLimits\.maxEntries\)/,
    );

    const big = Buffer.alloc(2048, "b");
    const heavy = directoryBlob({
      files: [{ name: "big", digest: sha256(big), isExecutable: false, nodeProperties: undefined }],
    });
    digest = await uploadRawAction(farm.clients, heavy.digest, [{ digest: sha256(big), data: big }, heavy]);
    ({ response } = await execute(farm.clients, digest));
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /2048 bytes of files.*execution\.inputLimits\.maxTotalBytes/);

    // 60 distinct directories side by side (each one file different).
    const children = Array.from({ length: 60 }, (_, i) =>
      directoryBlob({ symlinks: [{ name: `l${i}`, target: "x", nodeProperties: undefined }] }),
    );
    const many = directoryBlob({
      directories: children.map((c, i) => ({ name: `d${String(i).padStart(2, "0")}`, digest: c.digest })),
    });
    digest = await uploadRawAction(farm.clients, many.digest, [...children, many]);
    ({ response } = await execute(farm.clients, digest));
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /more than 50 distinct.*execution\.inputLimits\.maxDirectoryBlobs/);

    await runEcho(farm.clients, "after-limits");
  });
});

describe("the worker checks the tree again", () => {
  let farm: TestFarm;
  let workers: { stop(): Promise<void> };
  before(async () => {
    // A server that lets anything through (as one with other limits might): only the worker's own check stands.
    farm = await startTestFarm(
      { execution: { inputLimits: { maxEntries: 1e15, maxDepth: 100_000, maxTotalBytes: 1e15 } } },
      undefined,
      { workers: 0 },
    );
    workers = await startWorkers({
      connection: { address: farm.address, token: farm.workerToken },
      images: farm.config.images,
      worker: farm.config.worker,
      runImages: false,
      count: 1,
      workDir: `${farm.config.dataDir}/own-worker`,
      properties: [],
      name: "defended",
      log: silentLogger(),
    });
  });
  after(async () => {
    await workers.stop();
    await farm.close();
  });

  test("a DAG bomb and a 1,500-level tree that reach a worker are refused there, and it serves the next action", async () => {
    const bomb = dagBomb();
    let digest = await uploadRawAction(farm.clients, bomb.root, bomb.blobs);
    let { response } = await execute(farm.clients, digest);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /execution\.inputLimits\.maxEntries/);

    // As deep as paths below the server's 3072-byte limit go.
    const deep = deepTree(1_500);
    digest = await uploadRawAction(farm.clients, deep.root, deep.blobs);
    ({ response } = await execute(farm.clients, digest));
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${response.status?.message}`);
    assert.match(response.status?.message ?? "", /execution\.inputLimits\.maxDepth/);

    await runEcho(farm.clients, "worker-survived");
  });

  test("a path the worker's file system refuses (ENAMETOOLONG) is INVALID_ARGUMENT naming it, not INTERNAL", async () => {
    // A worker whose own directory is 1,600 bytes deep: a 3,000-byte input path passes the server, not Linux.
    const longDir = join(farm.config.dataDir, ...Array.from({ length: 8 }, (_, i) => `${i}`.repeat(200)));
    await mkdir(longDir, { recursive: true });
    const longWorkers = await startWorkers({
      connection: { address: farm.address, token: farm.workerToken },
      images: farm.config.images,
      worker: farm.config.worker,
      runImages: false,
      count: 1,
      workDir: longDir,
      properties: [{ name: "long-dir", value: "yes" }],
      name: "long",
      log: silentLogger(),
    });
    try {
      const deep = deepTree(12, "z".repeat(240));
      const command = Command.fromPartial({
        arguments: ["true"],
        platform: { properties: [{ name: "long-dir", value: "yes" }] },
      });
      const digest = await uploadRawAction(farm.clients, deep.root, deep.blobs, command);
      const { response } = await execute(farm.clients, digest);
      assert.equal(response.status?.code, Code.INVALID_ARGUMENT, `${response.status?.message}`);
      assert.match(response.status?.message ?? "", /^path root\/z+…z+: .*ENAMETOOLONG/);
      assert.doesNotMatch(response.status?.message ?? "", /0000000000/, "the worker's own directory is not shown");
    } finally {
      await longWorkers.stop();
    }
  });
});
