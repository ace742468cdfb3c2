import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import type { ServiceError } from "@grpc/grpc-js";
import { decodeOperation, execute, executeRequest, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unaryCall, unpackDetails } from "../../test/support/rpc.js";
import { ExecutionStage_Value, Tree } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { Code } from "../status/status.js";

const { CACHE_CHECK, QUEUED, EXECUTING, COMPLETED } = ExecutionStage_Value;
let farm: TestFarm;

before(async () => {
  farm = await startTestFarm({ execution: { maxTimeoutSeconds: 60 } }, undefined, {
    workers: 2,
    properties: [{ name: "OSFamily", value: "Linux" }],
  });
});
after(() => farm.close());

/** Whether a process whose command line contains `marker` is alive anywhere on the machine. */
async function processAlive(marker: string): Promise<boolean> {
  for (const pid of await readdir("/proc")) {
    if (!/^[0-9]+$/.test(pid)) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    if (cmdline.replaceAll("\0", " ").includes(marker) && !cmdline.includes("node")) return true;
  }
  return false;
}

describe("Execute", () => {
  test("runs the command in its working directory with exactly its environment, and collects every kind of output", async () => {
    const action = await uploadAction(farm.clients, {
      args: [
        "sh",
        "-c",
        "env | sort > ../env.txt; pwd > where.txt; mkdir -p dir/sub; echo deep > dir/sub/f; ln -s where.txt link; cat in/data; echo oops >&2; exit 3",
      ],
      env: { PATH: "/usr/bin:/bin", GREETING: "hello" },
      files: { "work/in/data": "input bytes\n" },
      workingDirectory: "work",
      outputFiles: ["where.txt", "../env.txt", "link"],
      outputDirectories: ["dir"],
    });
    const { response, updates } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.OK, response.status?.message);
    const result = response.result;
    assert.ok(result);
    assert.equal(result.exitCode, 3);
    assert.equal(await readBlob(farm.clients, result.stdoutDigest), "input bytes\n");
    assert.equal(await readBlob(farm.clients, result.stderrDigest), "oops\n");
    const files = new Map(result.outputFiles.map((f) => [f.path, f]));
    assert.equal(await readBlob(farm.clients, files.get("where.txt")?.digest), `${INPUT_ROOT_MOUNT}/work\n`);
    assert.equal(
      await readBlob(farm.clients, files.get("../env.txt")?.digest),
      `GREETING=hello\nPATH=/usr/bin:/bin\nPWD=${await readBlob(farm.clients, files.get("where.txt")?.digest)}`,
    );
    assert.deepEqual(
      result.outputFileSymlinks.map((s) => [s.path, s.target]),
      [["link", "where.txt"]],
    );
    assert.deepEqual(
      result.outputSymlinks.map((s) => [s.path, s.target]),
      [["link", "where.txt"]],
    );
    const tree = Tree.decode(
      Buffer.from(await readBlob(farm.clients, result.outputDirectories[0]?.treeDigest), "latin1"),
    );
    assert.equal(tree.root?.directories[0]?.name, "sub");
    assert.equal(tree.children[0]?.files[0]?.name, "f");
    const metadata = result.executionMetadata;
    assert.match(metadata?.worker ?? "", /^test-[01]$/);
    for (const field of [
      "queuedTimestamp",
      "workerStartTimestamp",
      "inputFetchStartTimestamp",
      "inputFetchCompletedTimestamp",
      "executionStartTimestamp",
      "executionCompletedTimestamp",
      "outputUploadStartTimestamp",
      "outputUploadCompletedTimestamp",
      "workerCompletedTimestamp",
    ] as const) {
      assert.ok(metadata?.[field], `${field} is set`);
    }
    // A failing command's result is not cached.
    assert.equal((await execute(farm.clients, action)).response.cachedResult, false);
    const stages = updates.map((u) => u.stage);
    assert.equal(stages[0], CACHE_CHECK);
    assert.deepEqual(stages.filter((s, i) => s !== stages[i - 1]).slice(1), [QUEUED, EXECUTING, COMPLETED]);
  });

  test("an action cannot change the worker's cached copy of an input file", async () => {
    const files = { "shared.txt": "pristine\n" };
    const vandal = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo spoiled > shared.txt; chmod 666 shared.txt; echo spoiled >> shared.txt; cat shared.txt"],
      files,
    });
    const reader = await uploadAction(farm.clients, { args: ["cat", "shared.txt"], files, salt: "reader" });
    await execute(farm.clients, vandal);
    await execute(farm.clients, vandal, { skipCacheLookup: true });
    const read = await execute(farm.clients, reader);
    assert.equal(await readBlob(farm.clients, read.response.result?.stdoutDigest), "pristine\n");
  });

  test("output_paths (REAPI 2.1) and output parents created before the command runs", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo a > deep/er/file; mkdir -p tree/x && echo t > tree/x/y"],
      outputPaths: ["deep/er/file", "tree"],
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
    assert.deepEqual(
      response.result?.outputFiles.map((f) => f.path),
      ["deep/er/file"],
    );
    assert.deepEqual(
      response.result?.outputDirectories.map((d) => d.path),
      ["tree"],
    );
  });

  test("a successful result is cached and answered from the cache the second time", async () => {
    const action = await uploadAction(farm.clients, { args: ["sh", "-c", "cat /proc/sys/kernel/random/uuid"] });
    const first = await execute(farm.clients, action);
    const second = await execute(farm.clients, action, { inlineStdout: true });
    assert.equal(first.response.cachedResult, false);
    assert.equal(second.response.cachedResult, true);
    assert.equal(
      second.response.result?.stdoutRaw.toString(),
      await readBlob(farm.clients, first.response.result?.stdoutDigest),
    );
    const skipped = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(skipped.response.cachedResult, false);
    assert.notEqual(
      await readBlob(farm.clients, skipped.response.result?.stdoutDigest),
      second.response.result?.stdoutRaw.toString(),
    );
  });

  test("identical actions in flight run once; do_not_cache ones run each time and are not cached", async () => {
    const shared = await uploadAction(farm.clients, {
      args: ["sh", "-c", "sleep 0.3; cat /proc/sys/kernel/random/uuid"],
      salt: "dedup",
    });
    const [a, b] = await Promise.all([execute(farm.clients, shared), execute(farm.clients, shared)]);
    assert.deepEqual(a.response.result?.stdoutDigest, b.response.result?.stdoutDigest);

    const private_ = await uploadAction(farm.clients, {
      args: ["sh", "-c", "sleep 0.3; cat /proc/sys/kernel/random/uuid"],
      doNotCache: true,
    });
    const [c, d] = await Promise.all([execute(farm.clients, private_), execute(farm.clients, private_)]);
    assert.notDeepEqual(c.response.result?.stdoutDigest, d.response.result?.stdoutDigest);
    await assert.rejects(
      unaryCall(farm.clients.ac.getActionResult.bind(farm.clients.ac), {
        instanceName: "",
        actionDigest: private_,
        inlineStdout: false,
        inlineStderr: false,
        inlineOutputFiles: [],
        digestFunction: 0,
      }),
      (err: ServiceError) => err.code === Code.NOT_FOUND,
    );
  });

  test("a timeout kills the action and keeps its partial stdout and stderr", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo partial; echo progress >&2; sleep 3131 & sleep 3132"],
      timeoutSeconds: 1,
    });
    const started = Date.now();
    const { response } = await execute(farm.clients, action);
    assert.ok(Date.now() - started < 10_000);
    assert.equal(response.status?.code, Code.DEADLINE_EXCEEDED);
    assert.match(response.status?.message ?? "", /timeout of 1 s/);
    assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "partial\n");
    assert.equal(await readBlob(farm.clients, response.result?.stderrDigest), "progress\n");
    assert.equal(await processAlive("sleep 3131"), false);
    assert.equal(await processAlive("sleep 3132"), false);
  });

  test("missing inputs give FAILED_PRECONDITION with a MISSING violation per blob, in the response", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["cat", "a", "b"],
      files: { a: "present", b: "absent one", c: "absent two" },
      skipUpload: ["b", "c"],
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION);
    const violations =
      unpackDetails(response.status ?? { code: 0, message: "", details: [] }).preconditionFailure?.violations ?? [];
    assert.equal(violations.length, 2);
    assert.ok(violations.every((v) => v.type === "MISSING" && v.subject.startsWith("blobs/")));

    const nothing = { hash: "0".repeat(64), sizeBytes: 12 };
    const missingAction = await execute(farm.clients, nothing);
    assert.equal(missingAction.response.status?.code, Code.FAILED_PRECONDITION);
    assert.match(missingAction.response.status?.message ?? "", new RegExp(nothing.hash));
  });

  test("an unsatisfiable platform is refused at once naming the property; Command.platform is read for old clients", async () => {
    const gpu = await uploadAction(farm.clients, { args: ["true"], platform: [{ name: "pool", value: "gpu" }] });
    const { response } = await execute(farm.clients, gpu);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION);
    assert.match(response.status?.message ?? "", /pool=gpu/);
    const old = await uploadAction(farm.clients, {
      args: ["true"],
      commandPlatform: [{ name: "OSFamily", value: "Windows" }],
    });
    assert.match((await execute(farm.clients, old)).response.status?.message ?? "", /OSFamily=Windows/);
    const linux = await uploadAction(farm.clients, {
      args: ["true"],
      commandPlatform: [{ name: "OSFamily", value: "Linux" }],
    });
    assert.equal((await execute(farm.clients, linux)).response.result?.exitCode, 0);
  });

  test("OSFamily, ISA and Arch as clients spell them run on the farm's own workers; another architecture is refused naming it", async () => {
    // The workers were told OSFamily=Linux; ISA and Arch they offer from the host (x86-64 or aarch64 here).
    const isa = process.arch === "arm64" ? "AArch64" : "x86_64";
    const other = process.arch === "arm64" ? "x86-64" : "aarch64";
    for (const platform of [
      [
        { name: "OSFamily", value: "linux" },
        { name: "ISA", value: isa },
      ],
      [{ name: "Arch", value: process.arch === "arm64" ? "arm64" : "amd64" }],
    ]) {
      const action = await uploadAction(farm.clients, { args: ["true"], platform, salt: JSON.stringify(platform) });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0);
    }
    const foreign = await uploadAction(farm.clients, {
      args: ["true"],
      platform: [
        { name: "OSFamily", value: "Linux" },
        { name: "ISA", value: other },
      ],
    });
    const { response } = await execute(farm.clients, foreign);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION);
    assert.equal(response.status?.message, `no worker of this farm offers the platform property ISA=${other}`);
    const violations = unpackDetails(response.status ?? { code: 0, message: "", details: [] }).preconditionFailure
      ?.violations;
    assert.deepEqual(
      violations?.map((v) => [v.type, v.subject]),
      [["UNSATISFIABLE_PLATFORM", `ISA=${other}`]],
    );
  });

  test("a timeout above the farm's maximum is INVALID_ARGUMENT", async () => {
    const action = await uploadAction(farm.clients, { args: ["true"], timeoutSeconds: 61 });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT);
    assert.match(response.status?.message ?? "", /action\.timeout: 61 s is more than this farm's maximum of 60 s/);
  });
});

describe("WaitExecution and Operations", () => {
  test("WaitExecution re-attaches after the client's Execute stream broke", async () => {
    const action = await uploadAction(farm.clients, { args: ["sh", "-c", "sleep 0.5; echo finished"] });
    const call = farm.clients.execution.execute(executeRequest(action));
    call.on("error", () => {});
    const first = await new Promise<ReturnType<typeof decodeOperation>>((resolve) =>
      call.once("data", (op) => resolve(decodeOperation(op))),
    );
    call.cancel();
    const waited = [];
    for await (const op of farm.clients.execution.waitExecution({ name: first.name })) waited.push(decodeOperation(op));
    const last = waited.at(-1);
    assert.equal(last?.done, true);
    assert.equal(await readBlob(farm.clients, last?.response?.result?.stdoutDigest), "finished\n");
    const got = await unaryCall(farm.clients.operations.getOperation.bind(farm.clients.operations), {
      name: first.name,
    });
    assert.equal(got.done, true);
    await assert.rejects(
      (async () => {
        for await (const _ of farm.clients.execution.waitExecution({ name: "operations/nope" })) {
        }
      })(),
      (err: ServiceError) => err.code === Code.NOT_FOUND,
    );
  });

  test("CancelOperation stops the action and kills its processes", async () => {
    const action = await uploadAction(farm.clients, { args: ["sh", "-c", "sleep 4141"], salt: "cancel" });
    const updates: ReturnType<typeof decodeOperation>[] = [];
    const stream = farm.clients.execution.execute(executeRequest(action));
    const ended = new Promise<void>((resolve) => stream.on("end", resolve));
    stream.on("data", (op) => updates.push(decodeOperation(op)));
    while (!(await processAlive("sleep 4141"))) await sleep(50);
    const name = updates[0]?.name ?? "";
    await unaryCall(farm.clients.operations.cancelOperation.bind(farm.clients.operations), { name });
    await ended;
    assert.equal(updates.at(-1)?.response?.status?.code, Code.CANCELLED);
    for (let i = 0; i < 50 && (await processAlive("sleep 4141")); i++) await sleep(100);
    assert.equal(await processAlive("sleep 4141"), false);
  });
});
