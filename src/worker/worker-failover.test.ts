import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { decodeOperation, executeRequest, readBlob, uploadAction } from "../../test/support/actions.js";
import { BERTH_BIN, type Clients, connect, type ServerProcess, spawnBerth } from "../../test/support/farm.js";
import { ExecutionStage_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

let dir: string;
let farm: ServerProcess;
let clients: Clients;
const workers: ChildProcess[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-failover-"));
  await chmod(dir, 0o755);
  farm = await spawnBerth(["--data-dir", join(dir, "data"), "--workers", "0"]);
  clients = connect(farm.address);
});
after(async () => {
  for (const w of workers) w.kill("SIGKILL");
  clients.close();
  await farm.stop();
  await rm(dir, { recursive: true, force: true });
});

function startWorker(name: string): ChildProcess {
  const child = spawn(
    process.execPath,
    [
      BERTH_BIN,
      "worker",
      "--scheduler",
      farm.address,
      // The farm's own worker token, which `berth serve` made in its data directory.
      "--token-file",
      join(dir, "data", "worker-token"),
      "--name",
      name,
      "--slots",
      "1",
      "--work-dir",
      join(dir, name),
      "--log-level",
      "warn",
    ],
    { stdio: "ignore" },
  );
  workers.push(child);
  return child;
}

test("an action whose worker is killed mid-action is queued again and completes on another worker", async () => {
  const first = startWorker("first");
  const action = await uploadAction(clients, { args: ["sh", "-c", "sleep 1.5; echo survived"] });
  const updates: ReturnType<typeof decodeOperation>[] = [];
  const stream = clients.execution.execute(executeRequest(action));
  const ended = new Promise<void>((resolve, reject) => {
    stream.on("end", resolve);
    stream.on("error", reject);
  });
  stream.on("data", (op) => updates.push(decodeOperation(op)));
  while (!updates.some((u) => u.stage === ExecutionStage_Value.EXECUTING)) await sleep(20);
  startWorker("second");
  await sleep(300); // the second worker joins while the first one runs the action
  first.kill("SIGKILL");
  await ended;
  const last = updates.at(-1);
  assert.equal(last?.response?.status?.code, 0, last?.response?.status?.message);
  assert.equal(last?.response?.result?.executionMetadata?.worker, "second-0");
  assert.equal(await readBlob(clients, last?.response?.result?.stdoutDigest), "survived\n");
  // The client saw the action go back to the queue and run again.
  const stages = updates.map((u) => u.stage).filter((s, i, all) => s !== all[i - 1]);
  assert.deepEqual(stages.slice(-4), [
    ExecutionStage_Value.EXECUTING,
    ExecutionStage_Value.QUEUED,
    ExecutionStage_Value.EXECUTING,
    ExecutionStage_Value.COMPLETED,
  ]);
});

test("the queue runs lower priority values first", async () => {
  // One worker only, so the three actions wait in the queue behind the blocker.
  for (const w of workers.splice(0)) w.kill("SIGKILL");
  await sleep(300);
  startWorker("ordered");
  const blocker = await uploadAction(clients, { args: ["sleep", "0.5"], salt: "blocker" });
  const run = (digest: { hash: string; sizeBytes: number }, priority: number) =>
    new Promise<ReturnType<typeof decodeOperation>>((resolve, reject) => {
      const s = clients.execution.execute(executeRequest(digest, { skipCacheLookup: true, priority }));
      let last: ReturnType<typeof decodeOperation> | undefined;
      s.on("data", (op) => {
        last = decodeOperation(op);
      });
      s.on("end", () => (last ? resolve(last) : reject(new Error("no operation"))));
      s.on("error", reject);
    });
  const blocking = run(blocker, 0);
  await sleep(200);
  const actions = await Promise.all(
    [5, 1, 3].map((p) => uploadAction(clients, { args: ["true"], salt: `priority ${p}` })),
  );
  const results = await Promise.all([
    run(actions[0] as never, 5),
    run(actions[1] as never, 1),
    run(actions[2] as never, 3),
  ]);
  await blocking;
  const started = results.map((r, i) => ({
    priority: [5, 1, 3][i],
    at:
      Number(r.response?.result?.executionMetadata?.workerStartTimestamp?.seconds ?? 0) * 1e9 +
      (r.response?.result?.executionMetadata?.workerStartTimestamp?.nanos ?? 0),
  }));
  assert.deepEqual(
    started.sort((a, b) => a.at - b.at).map((s) => s.priority),
    [1, 3, 5],
  );
});
