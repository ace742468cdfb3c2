import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadBlobs } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type BazelWorkerActionSpec, bazelWorkerAction } from "../../test/support/persistent-actions.js";
import { Action } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

/** What the test worker (test/support/persistent_worker.py) reports on its WorkResponse's output. */
interface Report {
  pid: number;
  count: number;
  probes: Record<string, string>;
  inputs: Record<string, string>;
  arguments: string[];
}

describe("remote persistent workers (Bazel 6 actions) on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  /** Uploads the action as Bazel would, executes it, and returns its result with the worker's report. */
  async function run(spec: BazelWorkerActionSpec) {
    const built = await bazelWorkerAction(spec);
    await uploadBlobs(farm.clients, [...built.blobs.values()]);
    const encoded = Buffer.from(Action.encode(built.action).finish());
    const digest = { hash: createHash("sha256").update(encoded).digest("hex"), sizeBytes: encoded.byteLength };
    const { response } = await execute(farm.clients, digest, { skipCacheLookup: true });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const result = response.result;
    const stderr = await readBlob(farm.clients, result?.stderrDigest);
    return { result, stderr, report: JSON.parse(stderr.trim().split("\n").at(-1) ?? "{}") as Report };
  }

  for (const protocol of ["json", "proto"] as const) {
    test(`${protocol}: the tool starts once; each action is a WorkRequest with its own arguments and inputs, its output comes back`, async () => {
      const common = { protocol, toolProtocol: protocol };
      const first = await run({
        ...common,
        name: `${protocol}-one`,
        requestArgs: ["--try-read=pkg/one.txt", `--try-write=bazel-out/k8-fastbuild/bin/pkg/${protocol}-one.txt`],
        sources: { "pkg/one.txt": "one\n" },
      });
      const second = await run({
        ...common,
        name: `${protocol}-two`,
        requestArgs: ["--try-read=pkg/two.txt", "--try-read=pkg/one.txt"],
        sources: { "pkg/two.txt": "two\n" },
      });
      assert.equal(first.result?.exitCode, 0, first.stderr);
      assert.equal(first.report.count, 1);
      assert.equal(second.report.count, 2, "the second action went to the same process");
      assert.equal(second.report.pid, first.report.pid);
      assert.ok(first.report.arguments.includes("--try-read=pkg/one.txt"), "the request carries the flagfile's lines");
      assert.deepEqual(second.report.probes, {
        "--try-read=pkg/two.txt": "ok",
        "--try-read=pkg/one.txt": "FileNotFoundError",
      });
      assert.ok("pkg/two.txt" in second.report.inputs && !("pkg/one.txt" in second.report.inputs));
      // The file the worker wrote for the first action is that action's output.
      const output = first.result?.outputFiles.find((f) => f.path.endsWith(`${protocol}-one.txt`));
      assert.equal(await readBlob(farm.clients, output?.digest), "written by a persistent worker\n");
    });
  }

  test("a tool that crashes on a request is restarted and asked again; crashing twice, the action runs as its one-shot command", async () => {
    const crashed = await run({ protocol: "json", toolProtocol: "json", name: "crash", requestArgs: ["--crash"] });
    // The one-shot run (no --persistent_worker) reads its flagfile itself and reports count 1, and no probes.
    assert.equal(crashed.result?.exitCode, 0, crashed.stderr);
    assert.equal(crashed.report.count, 1);
    assert.deepEqual(crashed.report.arguments, ["--crash"]);
    assert.equal(crashed.report.probes, undefined);
  });

  test("a hostile tool, in its sandbox, can neither write the host nor read the farm's files", async () => {
    const hostile = await run({
      protocol: "json",
      toolProtocol: "json",
      name: "hostile",
      requestArgs: [
        "--try-write=/etc/berth-persistent",
        `--try-read=${farm.config.dataDir}/worker-token`,
        "--background",
      ],
    });
    assert.equal(hostile.result?.exitCode, 0, hostile.stderr);
    assert.notEqual(hostile.report.probes["--try-write=/etc/berth-persistent"], "ok");
    assert.notEqual(hostile.report.probes[`--try-read=${farm.config.dataDir}/worker-token`], "ok");
  });
});
