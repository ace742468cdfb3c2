import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import type { ClientReadableStream } from "@grpc/grpc-js";
import {
  type DecodedOperation,
  decodeOperation,
  execute,
  executeRequest,
  uploadAction,
} from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { ExecutionStage_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Operation } from "../gen/google/longrunning/operations.js";
import { Code } from "../status/status.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm({ execution: { unwatchedOperationTimeoutSeconds: 0.5 } }, undefined, {
    workers: 1,
    runImages: false,
  });
});
after(() => farm.close());

/** Opens an Execute stream and resolves, with the operation's name, once it is queued. */
function executeUntilQueued(digest: {
  hash: string;
  sizeBytes: number;
}): Promise<{ name: string; stream: ClientReadableStream<Operation> }> {
  return new Promise((resolve, reject) => {
    const stream = farm.clients.execution.execute(executeRequest(digest, { skipCacheLookup: true }));
    stream.on("data", (op: Operation) => {
      const decoded = decodeOperation(op);
      if (decoded.stage === ExecutionStage_Value.QUEUED) resolve({ name: decoded.name, stream });
    });
    stream.on("error", (err: { code?: number }) => {
      if (err.code !== Code.CANCELLED) reject(err);
    });
  });
}

test("50 Execute streams the client abandoned are dropped from the queue and their actions never run", async () => {
  const clients = farm.clients;
  // Holds the only worker while the others queue behind it; its client follows it to the end.
  const blocker = await uploadAction(clients, { args: ["sleep", "2"], salt: "blocker" });
  const blocking = execute(clients, blocker, { skipCacheLookup: true });
  await sleep(200);

  const abandoned = await Promise.all(
    Array.from({ length: 50 }, (_, i) => uploadAction(clients, { args: ["sleep", "0.2"], salt: `abandoned ${i}` })),
  );
  const opened = await Promise.all(abandoned.map((digest) => executeUntilQueued(digest)));
  for (const { stream } of opened) stream.cancel();

  // One more abandoned stream whose client comes back in time with WaitExecution: it is kept.
  const resumedDigest = await uploadAction(clients, { args: ["echo", "resumed"], salt: "resumed" });
  const resumed = await executeUntilQueued(resumedDigest);
  resumed.stream.cancel();
  await sleep(100);
  const waiting = collect(clients.execution.waitExecution({ name: resumed.name }));

  await sleep(1200);
  for (const { name } of opened) {
    const op = decodeOperation(await unaryCall(clients.operations.getOperation.bind(clients.operations), { name }));
    assert.equal(op.done, true);
    assert.equal(op.response?.status?.code, Code.CANCELLED);
    assert.match(op.response?.status?.message ?? "", /execution\.unwatchedOperationTimeoutSeconds/);
  }

  const blocked = await blocking;
  assert.equal(blocked.response.status?.code ?? 0, Code.OK, blocked.response.status?.message);
  const last = (await waiting).map(decodeOperation).at(-1) as DecodedOperation;
  assert.equal(last.response?.status?.code ?? 0, Code.OK, last.response?.status?.message);
  assert.equal(last.response?.result?.exitCode, 0);

  // Had the 50 actions stayed queued, a new one would wait 10 s behind them.
  const probe = await uploadAction(clients, { args: ["true"], salt: "probe" });
  const started = performance.now();
  const { response } = await execute(clients, probe, { skipCacheLookup: true });
  assert.equal(response.status?.code ?? 0, Code.OK);
  assert.ok(performance.now() - started < 3000, `the probe waited ${performance.now() - started} ms`);
  // And none of them ran: no result was cached for any.
  for (const digest of abandoned) {
    await assert.rejects(
      unaryCall(clients.ac.getActionResult.bind(clients.ac), {
        instanceName: "",
        actionDigest: digest,
        inlineStdout: false,
        inlineStderr: false,
        inlineOutputFiles: [],
        digestFunction: 0,
      }),
      (err: { code?: number }) => err.code === Code.NOT_FOUND,
    );
  }
});

test("a running action whose client went away is cancelled on its worker", async () => {
  const clients = farm.clients;
  const digest = await uploadAction(clients, { args: ["sleep", "30"], salt: "running, unwatched" });
  const stream = clients.execution.execute(executeRequest(digest, { skipCacheLookup: true }));
  stream.on("error", () => {});
  const name = await new Promise<string>((resolve) => {
    stream.on("data", (op: Operation) => {
      const decoded = decodeOperation(op);
      if (decoded.stage === ExecutionStage_Value.EXECUTING) resolve(decoded.name);
    });
  });
  stream.cancel();
  await sleep(1200);
  const op = decodeOperation(await unaryCall(clients.operations.getOperation.bind(clients.operations), { name }));
  assert.equal(op.response?.status?.code, Code.CANCELLED);
  // The worker is free again at once, not after 30 s.
  const probe = await uploadAction(clients, { args: ["true"], salt: "after the running one" });
  const started = performance.now();
  const { response } = await execute(clients, probe, { skipCacheLookup: true });
  assert.equal(response.status?.code ?? 0, Code.OK);
  assert.ok(performance.now() - started < 3000, `the probe waited ${performance.now() - started} ms`);
});
