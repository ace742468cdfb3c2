import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { HOST_ROOT_ENVIRONMENT } from "../action/action-environment.js";
import { SHA256 } from "../digest/functions.js";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import { ActionResult, ExecutionStage_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";
import { type ExecutionJob, Scheduler, type WorkerConnection } from "./scheduler.js";

const schedulers: Scheduler[] = [];
afterEach(() => {
  for (const s of schedulers.splice(0)) s.close();
});

function makeScheduler(options: Partial<ConstructorParameters<typeof Scheduler>[0]> = {}) {
  const finished: ExecutionJob[] = [];
  const scheduler = new Scheduler({
    leaseTimeoutMs: 60_000,
    maxAttempts: 3,
    retainCompletedMs: 60_000,
    finish: async (job, outcome) => {
      finished.push(job);
      return { result: outcome.result, cachedResult: false, status: outcome.status, serverLogs: {}, message: "" };
    },
    ...options,
  });
  schedulers.push(scheduler);
  return { scheduler, finished };
}

let jobCount = 0;
function job(overrides: Partial<ExecutionJob> = {}): ExecutionJob {
  const n = jobCount++;
  return {
    instanceName: "",
    environment: HOST_ROOT_ENVIRONMENT,
    actionDigest: { fn: SHA256, hash: n.toString(16).padStart(64, "0"), sizeBytes: 10 },
    action: {
      commandDigest: undefined,
      inputRootDigest: undefined,
      timeout: undefined,
      doNotCache: false,
      salt: Buffer.alloc(0),
      platform: undefined,
    },
    command: {
      arguments: ["true"],
      environmentVariables: [],
      outputFiles: [],
      outputDirectories: [],
      outputPaths: [],
      platform: undefined,
      workingDirectory: "",
      outputNodeProperties: [],
      outputDirectoryFormat: 0,
    },
    platform: [],
    priority: 0,
    timeoutMs: 1000,
    doNotCache: false,
    queuedAt: new Date(),
    ...overrides,
  };
}

class FakeWorker implements WorkerConnection {
  readonly assigned: Assignment[] = [];
  readonly cancelled: string[] = [];
  constructor(
    readonly name: string,
    readonly properties: { name: string; value: string }[] = [],
    readonly slots = 1,
  ) {}
  assign(a: Assignment) {
    this.assigned.push(a);
  }
  cancel(leaseId: string) {
    this.cancelled.push(leaseId);
  }
  pullImage() {
    throw new Error("the scheduler never asks for pulls");
  }
}

const ok = (exitCode = 0) => ({
  status: { code: 0, message: "", details: [] },
  result: ActionResult.fromPartial({ exitCode }),
});

test("an action moves through QUEUED and EXECUTING to COMPLETED on a worker", async () => {
  const { scheduler } = makeScheduler();
  const stages: ExecutionStage_Value[] = [];
  const op = scheduler.submit(job());
  op.watch((o) => stages.push(o.stage));
  assert.equal(op.stage, ExecutionStage_Value.QUEUED);
  const worker = new FakeWorker("w1");
  scheduler.connect(worker);
  assert.equal(worker.assigned.length, 1);
  await scheduler.complete("w1", worker.assigned[0]?.leaseId ?? "", ok(7));
  assert.deepEqual(stages, [ExecutionStage_Value.EXECUTING, ExecutionStage_Value.COMPLETED]);
  assert.equal(op.response?.result?.exitCode, 7);
  assert.equal(scheduler.getOperation(op.name), op);
});

test("the input blobs the executor gathered travel with the assignment", () => {
  const { scheduler } = makeScheduler();
  const blob = (text: string) => ({
    digest: { fn: SHA256, hash: "ab".repeat(32), sizeBytes: text.length },
    data: Buffer.from(text),
  });
  scheduler.submit(
    job({ inputBlobs: { directories: [blob("directory")], files: [blob("file one"), blob("file two")] } }),
  );
  const worker = new FakeWorker("w1");
  scheduler.connect(worker);
  const [assigned] = worker.assigned;
  assert.deepEqual(
    assigned?.inputDirectories.map((b) => [b.digest?.sizeBytes, String(b.data)]),
    [[9, "directory"]],
  );
  assert.deepEqual(
    assigned?.inputFiles.map((b) => String(b.data)),
    ["file one", "file two"],
  );
});

test("identical actions in flight run once; do_not_cache ones run on their own", async () => {
  const { scheduler, finished } = makeScheduler();
  const shared = job();
  const a = scheduler.submit(shared);
  const b = scheduler.submit({ ...shared });
  const c = scheduler.submit({ ...shared, doNotCache: true });
  const worker = new FakeWorker("w", [], 4);
  scheduler.connect(worker);
  assert.equal(worker.assigned.length, 2);
  for (const assignment of worker.assigned) await scheduler.complete("w", assignment.leaseId, ok());
  assert.equal(finished.length, 2);
  assert.ok(a.done && b.done && c.done);
  assert.equal(a.response, b.response);
});

test("lower priority values run first, first in first out within a priority", () => {
  const { scheduler } = makeScheduler();
  const order = [
    job({ priority: 5 }),
    job({ priority: 1 }),
    job({ priority: 5 }),
    job({ priority: -3 }),
    job({ priority: 1 }),
  ];
  for (const j of order) scheduler.submit(j);
  const worker = new FakeWorker("w", [], 10);
  scheduler.connect(worker);
  const expected = [order[3], order[1], order[4], order[0], order[2]].map((j) => j?.actionDigest.hash);
  assert.deepEqual(
    worker.assigned.map((a) => a.actionDigest?.hash),
    expected,
  );
});

test("actions run only on workers that offer every property; unknown platforms are reported", () => {
  const { scheduler } = makeScheduler();
  const linux = new FakeWorker("linux", [
    { name: "OSFamily", value: "linux" },
    { name: "pool", value: "small" },
  ]);
  scheduler.connect(linux);
  const wanted = [
    { name: "OSFamily", value: "linux" },
    { name: "pool", value: "gpu" },
  ];
  assert.deepEqual(scheduler.unsatisfiable(wanted), { name: "pool", value: "gpu" });
  assert.equal(scheduler.unsatisfiable([{ name: "OSFamily", value: "linux" }]), undefined);
  scheduler.submit(job({ platform: wanted }));
  assert.equal(linux.assigned.length, 0);
  const gpu = new FakeWorker("gpu", wanted);
  scheduler.connect(gpu);
  assert.equal(gpu.assigned.length, 1);
});

test("a vanished worker's action is queued again and completes on another worker", async () => {
  const { scheduler } = makeScheduler();
  const op = scheduler.submit(job());
  const first = new FakeWorker("first");
  scheduler.connect(first);
  assert.equal(op.stage, ExecutionStage_Value.EXECUTING);
  scheduler.disconnect("first", "stream closed");
  assert.equal(op.stage, ExecutionStage_Value.QUEUED);
  const second = new FakeWorker("second");
  scheduler.connect(second);
  await scheduler.complete("first", first.assigned[0]?.leaseId ?? "", ok(1)); // stale: ignored
  assert.equal(op.done, false);
  await scheduler.complete("second", second.assigned[0]?.leaseId ?? "", ok(0));
  assert.equal(op.response?.result?.exitCode, 0);
});

test("a worker that stops sending heartbeats loses its lease; repeated loss fails the action", async () => {
  const { scheduler } = makeScheduler({ leaseTimeoutMs: 200, maxAttempts: 2 });
  const op = scheduler.submit(job());
  scheduler.connect(new FakeWorker("silent1"));
  await sleep(400);
  assert.equal(op.stage, ExecutionStage_Value.QUEUED);
  scheduler.connect(new FakeWorker("silent2"));
  assert.equal(op.stage, ExecutionStage_Value.EXECUTING);
  await sleep(400);
  assert.equal(op.response?.status?.code, Code.UNAVAILABLE);
  assert.match(op.response?.status?.message ?? "", /started 2 times/);
});

test("cancelling the only operation of a running action cancels it on the worker", async () => {
  const { scheduler } = makeScheduler();
  const op = scheduler.submit(job());
  const worker = new FakeWorker("w");
  scheduler.connect(worker);
  assert.equal(scheduler.cancel(op.name), true);
  assert.equal(op.response?.status?.code, Code.CANCELLED);
  assert.deepEqual(worker.cancelled, [worker.assigned[0]?.leaseId]);
  // The freed slot takes the next action.
  scheduler.submit(job());
  assert.equal(worker.assigned.length, 2);
  assert.equal(scheduler.cancel("operations/unknown"), false);
});

test("an action asking for a warm runner goes to the worker holding one of its key, not to the first idle worker", () => {
  const { scheduler } = makeScheduler({ warmRunnerWaitMs: 60_000 });
  const cold = new FakeWorker("cold");
  const warm = new FakeWorker("warm");
  scheduler.connect(cold);
  scheduler.connect(warm);
  scheduler.warmRunners("warm", ["key-a"]);
  scheduler.submit(job({ runnerKey: "key-a" }));
  assert.equal(warm.assigned.length, 1);
  assert.equal(cold.assigned.length, 0);
  // Another key, or none, is not held back: the idle worker takes it.
  scheduler.submit(job({ runnerKey: "key-b" }));
  assert.equal(cold.assigned.length, 1);
});

test("while the holder is busy the action waits for it, and gets it when the holder's slot frees", async () => {
  const { scheduler } = makeScheduler({ warmRunnerWaitMs: 60_000 });
  const cold = new FakeWorker("cold");
  const warm = new FakeWorker("warm");
  scheduler.connect(warm);
  scheduler.submit(job()); // keeps the holder's one slot busy
  assert.equal(warm.assigned.length, 1);
  scheduler.connect(cold);
  scheduler.warmRunners("warm", ["key-a"]);
  const op = scheduler.submit(job({ runnerKey: "key-a" }));
  assert.equal(cold.assigned.length, 0, "taken by a worker without the warm runner");
  assert.equal(op.stage, ExecutionStage_Value.QUEUED);
  await scheduler.complete("warm", warm.assigned[0]?.leaseId ?? "", ok());
  assert.equal(warm.assigned.length, 2);
  assert.equal(cold.assigned.length, 0);
});

test("an action does not wait for a busy holder longer than warmRunnerWaitMs: then any worker takes it", async () => {
  const { scheduler } = makeScheduler({ warmRunnerWaitMs: 150 });
  const cold = new FakeWorker("cold");
  const warm = new FakeWorker("warm");
  scheduler.connect(warm);
  scheduler.submit(job());
  scheduler.connect(cold);
  scheduler.warmRunners("warm", ["key-a"]);
  const op = scheduler.submit(job({ runnerKey: "key-a", queuedAt: new Date() }));
  assert.equal(cold.assigned.length, 0);
  await sleep(400);
  assert.equal(cold.assigned.length, 1, "still waiting for the busy holder");
  assert.equal(op.stage, ExecutionStage_Value.EXECUTING);
});

test("without warmRunnerWaitMs, or once the holder reports the runner gone, nothing waits", () => {
  for (const [wait, keys] of [
    [0, ["key-a"]],
    [60_000, []],
  ] as const) {
    const { scheduler } = makeScheduler({ warmRunnerWaitMs: wait });
    const cold = new FakeWorker("cold");
    const warm = new FakeWorker("warm");
    scheduler.connect(warm);
    scheduler.submit(job());
    scheduler.connect(cold);
    scheduler.warmRunners("warm", ["key-a"]);
    scheduler.warmRunners("warm", keys);
    scheduler.submit(job({ runnerKey: "key-a" }));
    assert.equal(cold.assigned.length, 1, `wait ${wait}, keys ${keys.join()}`);
  }
});
