import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { LocalBlob } from "../merkle/local-tree.js";
import { Code, StatusError } from "../status/status.js";
import { type ActionExecutor, type ExecutedAction, executionContext, failedCompletion } from "./action-executor.js";
import { InlineOutputsExecutor } from "./inline-outputs-executor.js";

/** A tiny real executor whose outputs are the given blobs. */
class OutputsExecutor implements ActionExecutor {
  constructor(private readonly blobs: LocalBlob[]) {}
  async execute(assignment: Assignment): Promise<ExecutedAction> {
    return { completion: failedCompletion(assignment.leaseId, new StatusError(Code.OK, "")), pending: this.blobs };
  }
}

async function fileOf(dir: string, name: string, data: Buffer): Promise<LocalBlob> {
  await writeFile(join(dir, name), data);
  return { digest: await digestOf(SHA256, data), path: join(dir, name) };
}

test("outputs up to the blob limit go inline, read from their files, until the total limit; the rest stay to upload", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "berth-inline-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const limits = { blobBytes: 100, totalBytes: 250 };
  const atLimit = await fileOf(dir, "a", Buffer.alloc(100, "a"));
  const overLimit = await fileOf(dir, "b", Buffer.alloc(101, "b"));
  const kept = { digest: await digestOf(SHA256, Buffer.from("kept")), data: Buffer.from("kept") };
  const second = await fileOf(dir, "c", Buffer.alloc(100, "c"));
  const pastTotal = await fileOf(dir, "d", Buffer.alloc(50, "d"));
  const executor = new InlineOutputsExecutor(
    new OutputsExecutor([atLimit, overLimit, kept, second, pastTotal]),
    limits,
  );
  const context = executionContext(dir, new AbortController().signal);
  const { completion, pending } = await executor.execute(Assignment.fromPartial({ leaseId: "l" }), context);
  assert.deepEqual(
    completion.inlineBlobs.map((b) => [b.digest?.hash, b.data.toString()]),
    [
      [atLimit.digest.hash, "a".repeat(100)],
      [kept.digest.hash, "kept"],
      [second.digest.hash, "c".repeat(100)],
    ],
  );
  // 100 + 4 + 100 = 204: 50 more would pass the total of 250.
  assert.deepEqual(pending, [overLimit, pastTotal]);
});

test("a failed execution has nothing to put inline", async () => {
  const executor = new InlineOutputsExecutor(new OutputsExecutor([]));
  const context = executionContext("/nonexistent", new AbortController().signal);
  const { completion, pending } = await executor.execute(Assignment.fromPartial({ leaseId: "l" }), context);
  assert.deepEqual([completion.inlineBlobs, pending], [[], []]);
});
