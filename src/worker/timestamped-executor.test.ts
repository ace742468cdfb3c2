import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { Timestamp } from "../gen/google/protobuf/timestamp.js";
import { Code, StatusError } from "../status/status.js";
import { type ActionExecutor, type ExecutedAction, executionContext, failedCompletion } from "./action-executor.js";
import { nowTimestamp } from "./timestamp.js";
import { TimestampedExecutor } from "./timestamped-executor.js";

const ms = (t: Timestamp | undefined) => (t ? t.seconds * 1000 + t.nanos / 1e6 : Number.NaN);

/** A tiny real executor: takes a few milliseconds and stamps its execution, as the local executor does. */
class SleepingExecutor implements ActionExecutor {
  constructor(private readonly fail = false) {}
  async execute(assignment: Assignment, context: ReturnType<typeof executionContext>): Promise<ExecutedAction> {
    await sleep(5);
    context.metadata.executionStartTimestamp = nowTimestamp();
    await sleep(5);
    if (this.fail) throw new StatusError(Code.FAILED_PRECONDITION, "inputs missing");
    return { completion: failedCompletion(assignment.leaseId, new StatusError(Code.OK, "")), pending: [] };
  }
}

test("the whole execution is stamped around the inner one: worker, queued, start before and completion after", async () => {
  const queued = { seconds: 1_700_000_000, nanos: 5 };
  const assignment = Assignment.fromPartial({ leaseId: "lease", queuedTimestamp: queued });
  const context = executionContext("/nonexistent", new AbortController().signal);
  await new TimestampedExecutor(new SleepingExecutor(), "worker-7").execute(assignment, context);
  const { metadata } = context;
  assert.equal(metadata.worker, "worker-7");
  assert.deepEqual(metadata.queuedTimestamp, queued);
  const [start, inner, completed] = [
    ms(metadata.workerStartTimestamp),
    ms(metadata.executionStartTimestamp),
    ms(metadata.workerCompletedTimestamp),
  ];
  assert.ok(start < inner && inner < completed, `${start} < ${inner} < ${completed}`);
});

test("an execution that fails passes its error on, and is not stamped as completed", async () => {
  const context = executionContext("/nonexistent", new AbortController().signal);
  const executor = new TimestampedExecutor(new SleepingExecutor(true), "worker-7");
  await assert.rejects(executor.execute(Assignment.fromPartial({ leaseId: "x" }), context), {
    code: Code.FAILED_PRECONDITION,
  });
  assert.ok(context.metadata.workerStartTimestamp);
  assert.equal(context.metadata.workerCompletedTimestamp, undefined);
});
