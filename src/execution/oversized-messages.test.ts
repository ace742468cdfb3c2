import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { execute, readBlob, uploadAction, uploadBlobs } from "../../test/support/actions.js";
import { directoryBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { type Clients, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { uploadLargeBlob } from "../../test/support/large-blobs.js";
import { collect, statusDetails, unpackDetails } from "../../test/support/rpc.js";
import { Action, Command } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { silentLogger } from "../log/log.js";
import { Code } from "../status/status.js";
import { startWorkers } from "../worker/local-workers.js";

const MiB = 1024 * 1024;

interface Blob {
  digest: WireDigest;
  data: Buffer;
}

/** Uploads an Action naming `command` (a Command blob, or just its digest) and `root`; returns its digest. */
async function uploadRawAction(
  clients: Clients,
  command: WireDigest | Blob,
  root: WireDigest,
  blobs: Blob[] = [],
): Promise<WireDigest> {
  const commandBlob = "data" in command ? [command] : [];
  const action = Buffer.from(
    Action.encode(
      Action.fromPartial({ commandDigest: "data" in command ? command.digest : command, inputRootDigest: root }),
    ).finish(),
  );
  await uploadBlobs(clients, [...blobs, ...commandBlob, { digest: sha256(action), data: action }]);
  return sha256(action);
}

function commandBlob(command: Partial<Command>): Blob {
  const data = Buffer.from(Command.encode(Command.fromPartial(command)).finish());
  return { digest: sha256(data), data };
}

/** Executes `action` and asserts a quick FAILED_PRECONDITION whose MESSAGE_SIZE_LIMIT violation names `key`. */
async function assertRefused(clients: Clients, action: WireDigest, message: RegExp, key: string): Promise<void> {
  const started = Date.now();
  const { response, updates } = await execute(clients, action, { skipCacheLookup: true });
  const elapsed = Date.now() - started;
  assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
  assert.match(response.status?.message ?? "", message);
  const violation = unpackDetails(response.status as never).preconditionFailure?.violations[0];
  assert.equal(violation?.type, "MESSAGE_SIZE_LIMIT");
  assert.equal(violation?.subject, key);
  assert.ok(!updates.some((u) => u.stage === 2 || u.stage === 3), "the action was queued");
  // Reading 200 MiB, hashing it to serve it and decoding it would take seconds on this machine.
  assert.ok(elapsed < 1500, `took ${elapsed} ms`);
}

describe("blobs too large to be an Action, a Command or a Directory are refused before they are read", () => {
  let farm: TestFarm;
  // 200 MiB, really stored: the refusal must come from its size, not from its absence.
  const huge: Blob = (() => {
    const data = Buffer.alloc(200 * MiB, 0x0a);
    return { data, digest: sha256(data) };
  })();
  const empty = directoryBlob({});
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
    await uploadLargeBlob(farm.clients, huge);
  });
  after(() => farm.close());

  test("a 200 MiB action_digest is FAILED_PRECONDITION naming execution.maxActionBytes", async () => {
    await assertRefused(
      farm.clients,
      huge.digest,
      /^action_digest \([0-9a-f]{64}\/209715200\) is a blob of 209715200 bytes, more than this farm's limit of 1048576 bytes for that message \(execution\.maxActionBytes\)$/,
      "execution.maxActionBytes",
    );
  });

  test("a 200 MiB command_digest is FAILED_PRECONDITION naming execution.maxCommandBytes", async () => {
    const action = await uploadRawAction(farm.clients, huge.digest, empty.digest, [empty]);
    await assertRefused(
      farm.clients,
      action,
      /^action\.command_digest \(.*\) is a blob of 209715200 bytes, more than this farm's limit of 16777216 bytes .*\(execution\.maxCommandBytes\)$/,
      "execution.maxCommandBytes",
    );
  });

  test("a 200 MiB input root, or Directory below it, is FAILED_PRECONDITION naming the path and inputLimits.maxDirectoryBytes", async () => {
    const command = commandBlob({ arguments: ["true"] });
    let action = await uploadRawAction(farm.clients, command, huge.digest);
    await assertRefused(
      farm.clients,
      action,
      /^the input root \(.*\) is a blob of 209715200 bytes, more than this farm's limit of 4096000 bytes .*\(execution\.inputLimits\.maxDirectoryBytes\)$/,
      "execution.inputLimits.maxDirectoryBytes",
    );
    const src = directoryBlob({ directories: [{ name: "big", digest: huge.digest }] });
    const root = directoryBlob({ directories: [{ name: "src", digest: src.digest }] });
    action = await uploadRawAction(farm.clients, command, root.digest, [src, root]);
    await assertRefused(
      farm.clients,
      action,
      /^input directory "src\/big" \(.*\) is a blob of 209715200 bytes.*\(execution\.inputLimits\.maxDirectoryBytes\)$/,
      "execution.inputLimits.maxDirectoryBytes",
    );
  });

  test("GetTree of a 200 MiB root, or of a tree naming it, is FAILED_PRECONDITION naming inputLimits.maxDirectoryBytes", async () => {
    const parent = directoryBlob({ directories: [{ name: "big", digest: huge.digest }] });
    await uploadBlobs(farm.clients, [parent]);
    for (const [rootDigest, what] of [
      [huge.digest, "root_digest"],
      [parent.digest, "a Directory below root_digest"],
    ] as const) {
      const started = Date.now();
      await assert.rejects(
        collect(
          farm.clients.cas.getTree({ instanceName: "", rootDigest, pageSize: 0, pageToken: "", digestFunction: 0 }),
        ),
        (err: ServiceError) => {
          assert.equal(err.code, Code.FAILED_PRECONDITION, err.message);
          assert.match(
            err.details,
            new RegExp(
              `^${what} \\(.*\\) is a blob of 209715200 bytes.*\\(execution\\.inputLimits\\.maxDirectoryBytes\\)$`,
            ),
          );
          assert.equal(statusDetails(err).preconditionFailure?.violations[0]?.type, "MESSAGE_SIZE_LIMIT");
          return true;
        },
      );
      assert.ok(Date.now() - started < 1500, `took ${Date.now() - started} ms`);
    }
  });

  test("a 3 MiB Command (20,000 output paths) is under the limit and runs; so does the next action", async () => {
    const outputPaths = Array.from(
      { length: 20_000 },
      (_, i) => `out/${String(i).padStart(6, "0")}/${"o".repeat(160)}`,
    );
    const command = commandBlob({ arguments: ["/bin/sh", "-c", "echo big-command"], outputPaths });
    assert.ok(command.data.byteLength > 3 * MiB, `${command.data.byteLength} bytes`);
    const action = await uploadRawAction(farm.clients, command, empty.digest, [empty]);
    const { response } = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
    assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "big-command\n");
  });
});

describe("a worker refuses a Directory over its own maxDirectoryBytes before reading it", () => {
  let farm: TestFarm;
  let workers: { stop(): Promise<void> };
  before(async () => {
    // A server that lets 64 MiB Directory messages through (as one with other limits might).
    farm = await startTestFarm({ execution: { inputLimits: { maxDirectoryBytes: "64MiB" } } }, undefined, {
      workers: 0,
    });
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

  test("a valid 17 MiB Directory the server accepted is FAILED_PRECONDITION on the worker, which serves the next action", async () => {
    const file = Buffer.from("padded\n");
    // One file whose node properties carry 17 MiB: a valid Directory, over the worker's default 4000 KiB.
    const big = directoryBlob({
      files: [
        {
          name: "f",
          digest: sha256(file),
          isExecutable: false,
          nodeProperties: {
            properties: [{ name: "pad", value: "x".repeat(17 * MiB) }],
            mtime: undefined,
            unixMode: undefined,
          },
        },
      ],
    });
    const root = directoryBlob({ directories: [{ name: "big", digest: big.digest }] });
    await uploadLargeBlob(farm.clients, big);
    const command = commandBlob({ arguments: ["true"] });
    const action = await uploadRawAction(farm.clients, command, root.digest, [
      { digest: sha256(file), data: file },
      root,
    ]);
    const { response } = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(
      response.status?.message ?? "",
      /input directory "big" \(.*\) is a blob of 178\d{5} bytes, more than this farm's limit of 4096000 bytes .*\(execution\.inputLimits\.maxDirectoryBytes\)/,
    );

    const echo = await uploadAction(farm.clients, { args: ["/bin/sh", "-c", "echo after"], salt: "after-big" });
    const ran = await execute(farm.clients, echo, { skipCacheLookup: true });
    assert.equal(ran.response.status?.code ?? 0, Code.OK, ran.response.status?.message);
    assert.equal(await readBlob(farm.clients, ran.response.result?.stdoutDigest), "after\n");
  });
});

describe("a tree of many large Directory messages", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ execution: { inputLimits: { maxTotalDirectoryBytes: "1MiB" } } }, undefined, {
      workers: 0,
    });
  });
  after(() => farm.close());

  test("is refused naming inputLimits.maxTotalDirectoryBytes, before anything is queued", async () => {
    // 40 distinct Directory messages of 100 KB each (padded with a node property), side by side: 4 MB.
    const file = Buffer.from("f\n");
    const children = Array.from({ length: 40 }, (_, i) =>
      directoryBlob({
        files: [
          {
            name: "f",
            digest: sha256(file),
            isExecutable: false,
            nodeProperties: {
              properties: [{ name: `pad${i}`, value: "x".repeat(100_000) }],
              mtime: undefined,
              unixMode: undefined,
            },
          },
        ],
      }),
    );
    const root = directoryBlob({
      directories: children.map((child, i) => ({ name: `d${String(i).padStart(2, "0")}`, digest: child.digest })),
    });
    const command = commandBlob({ arguments: ["true"] });
    await uploadBlobs(farm.clients, [{ digest: sha256(file), data: file }, ...children.slice(0, 20)]);
    await uploadBlobs(farm.clients, children.slice(20));
    const action = await uploadRawAction(farm.clients, command, root.digest, [root]);
    const { response, updates } = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(
      response.status?.message ?? "",
      /^the input root has more than 1048576 bytes of Directory messages, more than this farm's limit of 1048576 \(execution\.inputLimits\.maxTotalDirectoryBytes\)$/,
    );
    const violation = unpackDetails(response.status as never).preconditionFailure?.violations[0];
    assert.equal(violation?.type, "INPUT_TREE_LIMIT");
    assert.equal(violation?.subject, "execution.inputLimits.maxTotalDirectoryBytes");
    assert.ok(!updates.some((u) => u.stage === 2 || u.stage === 3), "the action was queued");
  });
});
