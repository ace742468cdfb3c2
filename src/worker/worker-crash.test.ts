import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import {
  type DecodedOperation,
  decodeOperation,
  executeRequest,
  readBlob,
  uploadAction,
} from "../../test/support/actions.js";
import { type Clients, connect, type ServerProcess, spawnBerth } from "../../test/support/farm.js";
import { ExecutionStage_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Operation } from "../gen/google/longrunning/operations.js";
import { Code } from "../status/status.js";

const run = promisify(execFile);
let dir: string;
let berth: ServerProcess;
let clients: Clients;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-worker-crash-"));
  await chmod(dir, 0o755);
  // Three local workers in one child process, which the server restarts when it dies.
  berth = await spawnBerth(["--data-dir", join(dir, "data"), "--workers", "3"]);
  clients = connect(berth.address);
});
after(async () => {
  clients.close();
  await berth.stop();
  await rm(dir, { recursive: true, force: true });
});

async function workerProcess(): Promise<number | undefined> {
  const { stdout } = await run("ps", ["-o", "pid=", "--ppid", String(berth.child.pid)]).catch(() => ({ stdout: "" }));
  const pids = stdout
    .split("\n")
    .map((line) => Number(line.trim()))
    .filter((n) => n > 0);
  return pids.length === 1 ? pids[0] : undefined;
}

/** Follows an Execute stream: every update, and the end. */
function follow(digest: { hash: string; sizeBytes: number }) {
  const updates: DecodedOperation[] = [];
  const stream = clients.execution.execute(executeRequest(digest, { skipCacheLookup: true }));
  stream.on("data", (op: Operation) => updates.push(decodeOperation(op)));
  const done = new Promise<DecodedOperation>((resolve, reject) => {
    stream.on("end", () => resolve(updates.at(-1) as DecodedOperation));
    stream.on("error", reject);
  });
  /** How many times the action has started (EXECUTING after another stage). */
  const starts = () =>
    updates.filter((u, i) => u.stage === ExecutionStage_Value.EXECUTING && updates[i - 1]?.stage !== u.stage).length;
  return { updates, done, starts };
}

test("an action that crashes its worker process every time fails after maxAttempts, and the actions beside it complete", async () => {
  // The "crashing" action: each time it runs, the test kills the worker process, as a crash would.
  const crasher = follow(await uploadAction(clients, { args: ["sleep", "60"], salt: "crasher" }));
  const innocents = await Promise.all(
    [1, 2].map(async (i) =>
      follow(
        await uploadAction(clients, { args: ["/bin/sh", "-c", `sleep 1; echo innocent ${i}`], salt: `innocent ${i}` }),
      ),
    ),
  );
  // All three start together on the process's three workers.
  while (![crasher, ...innocents].every((f) => f.starts() === 1)) await sleep(20);

  let kills = 0;
  let finished = false;
  void crasher.done.finally(() => {
    finished = true;
  });
  while (!finished) {
    if (crasher.starts() > kills && crasher.updates.at(-1)?.stage === ExecutionStage_Value.EXECUTING) {
      const pid = await workerProcess();
      if (pid !== undefined) {
        process.kill(pid, "SIGKILL");
        kills++;
        // Until the server sees the streams drop and requeues the action.
        while (crasher.updates.at(-1)?.stage === ExecutionStage_Value.EXECUTING && !finished) await sleep(20);
      }
    }
    await sleep(20);
  }
  const last = await crasher.done;
  assert.equal(kills, 3);
  assert.equal(last.response?.status?.code, Code.UNAVAILABLE, last.response?.status?.message);
  assert.match(
    last.response?.status?.message ?? "",
    /started 3 times \(execution\.maxAttempts\) and each time its worker vanished while running it/,
  );

  for (const [i, innocent] of innocents.entries()) {
    const done = await innocent.done;
    assert.equal(done.response?.status?.code ?? 0, Code.OK, done.response?.status?.message);
    assert.equal(await readBlob(clients, done.response?.result?.stdoutDigest), `innocent ${i + 1}\n`);
    // One crash (the first, where they ran beside it) cost them one attempt; they then ran once more.
    assert.equal(innocent.starts(), 2);
  }
});
