import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { uploadBlobs } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm, testUidBase } from "../../test/support/farm.js";
import { dir, encodeTree, file, symlink } from "../../test/support/trees.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Action, Command, DigestFunction_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Timestamp } from "../gen/google/protobuf/timestamp.js";
import { BubblewrapRunner } from "../runner/bubblewrap-runner.js";
import { Runners } from "../runner/runners.js";
import { BubblewrapSandbox } from "../sandbox/bubblewrap.js";
import { Code } from "../status/status.js";
import { ActionEnvironments } from "./action-environments.js";
import { executionContext } from "./action-executor.js";
import type { ActionInputs } from "./action-inputs.js";
import { DirectoryCache } from "./directory-cache.js";
import { FileCache } from "./file-cache.js";
import { LocalActionExecutor } from "./local-executor.js";
import { actionUser } from "./local-workers.js";
import { RemoteCas } from "./remote-cas.js";

// The steps alone, without the wrappers: a real farm's CAS for the inputs, a real sandbox to run in.
let farm: TestFarm;
let cas: RemoteCas;
let workDir: string;
let executor: LocalActionExecutor;

before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address);
  workDir = await mkdtemp(join(tmpdir(), "berth-local-executor-"));
  await chmod(workDir, 0o755);
  const owner = actionUser(0, testUidBase());
  const root = process.getuid?.() === 0;
  const inputs: ActionInputs = {
    cas,
    files: await FileCache.open(join(workDir, "cache"), 1024 ** 3, { ownerWrites: root }),
    directories: new DirectoryCache(),
    owner: root ? owner : undefined,
    limits: DEFAULT_INPUT_TREE_LIMITS,
  };
  const environments = new ActionEnvironments({
    workerName: "local-test",
    images: undefined,
    expandedRoots: undefined,
    inputRootPath: "/run/berth/execroot",
  });
  const sandbox = new BubblewrapSandbox({ uid: owner.uid, gid: owner.gid });
  const runners = new Runners({ "namespace-sandbox": new BubblewrapRunner(sandbox, { layeredRoots: root }) });
  executor = new LocalActionExecutor(inputs, environments, runners);
});
after(async () => {
  cas?.close();
  await farm?.close();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

let leases = 0;

async function assignment(
  tree: ReturnType<typeof dir>,
  script: string,
  more: Partial<Assignment> & { workingDirectory?: string } = { hostRoot: {} },
): Promise<Assignment> {
  const encoded = encodeTree(tree);
  await uploadBlobs(farm.clients, encoded.blobs);
  const { workingDirectory = "", ...fields } = more;
  return Assignment.fromPartial({
    leaseId: `lease-${leases++}`,
    digestFunction: DigestFunction_Value.SHA256,
    action: Action.fromPartial({ inputRootDigest: encoded.root }),
    command: Command.fromPartial({
      arguments: ["/bin/sh", "-c", script],
      environmentVariables: [{ name: "PATH", value: "/usr/bin:/bin" }],
      outputFiles: ["out.txt"],
      workingDirectory,
    }),
    timeout: { seconds: 60, nanos: 0 },
    ...fields,
  });
}

const ms = (t: Timestamp | undefined) => (t ? t.seconds * 1000 + t.nanos / 1e6 : Number.NaN);

test("the steps run the command and leave every output to the wrappers: nothing sent, phases stamped in order", async () => {
  const job = await assignment(dir({ "in.txt": file(`input ${Date.now()}\n`) }), "cat in.txt > out.txt; echo done");
  const context = executionContext(join(workDir, "actions", job.leaseId), new AbortController().signal);
  const { completion, pending } = await executor.execute(job, context);
  assert.equal(completion.status?.code, Code.OK, completion.status?.message);
  assert.equal(completion.result?.exitCode, 0);
  assert.deepEqual(completion.inlineBlobs, []);
  const named = [completion.result?.outputFiles[0]?.digest, completion.result?.stdoutDigest];
  assert.deepEqual(
    pending.map((b) => b.digest.hash),
    named.map((d) => d?.hash),
  );
  // Not uploaded: that is the upload wrapper's part.
  const missing = await cas.findMissing(pending.map((b) => b.digest));
  assert.ok(missing.some((d) => d.hash === completion.result?.stdoutDigest?.hash));
  const m = context.metadata;
  const order = [
    m.inputFetchStartTimestamp,
    m.inputFetchCompletedTimestamp,
    m.executionStartTimestamp,
    m.executionCompletedTimestamp,
    m.outputUploadStartTimestamp,
  ].map(ms);
  assert.deepEqual(
    order,
    [...order].sort((a, b) => a - b),
  );
  assert.ok(order.every(Number.isFinite));
  assert.ok(context.writtenBytes > 0);
});

test("an image on a worker that runs none is FAILED_PRECONDITION before anything is laid out", async () => {
  const job = await assignment(dir({}), "true", { containerImage: { reference: "registry.example/tool:1" } });
  const context = executionContext(join(workDir, "actions", job.leaseId), new AbortController().signal);
  await assert.rejects(executor.execute(job, context), (err: { code: number; message: string }) => {
    return (
      err.code === Code.FAILED_PRECONDITION &&
      /runs no container images \(registry\.example\/tool:1\)/.test(err.message)
    );
  });
  assert.equal(existsSync(context.directory), false);
});

test("a working directory that is a symlink out of the input root is INVALID_ARGUMENT; the command never runs", async () => {
  const marker = join(workDir, `escaped-${Date.now()}`);
  const tree = dir({ wd: symlink(workDir) });
  const job = await assignment(tree, `touch ${marker}`, { hostRoot: {}, workingDirectory: "wd" });
  const context = executionContext(join(workDir, "actions", job.leaseId), new AbortController().signal);
  await assert.rejects(executor.execute(job, context), (err: { code: number; message: string }) => {
    return err.code === Code.INVALID_ARGUMENT && /command\.working_directory/.test(err.message);
  });
  assert.equal(existsSync(marker), false);
  assert.equal(context.metadata.executionStartTimestamp, undefined);
});

test("a cancelled action is CANCELLED at once, its command killed", async () => {
  const job = await assignment(dir({}), "sleep 30");
  const controller = new AbortController();
  const context = executionContext(join(workDir, "actions", job.leaseId), controller.signal);
  const started = Date.now();
  setTimeout(() => controller.abort(), 300);
  await assert.rejects(executor.execute(job, context), { code: Code.CANCELLED });
  assert.ok(Date.now() - started < 10_000);
});
