import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { LocalBlob } from "../merkle/local-tree.js";
import { Code, StatusError } from "../status/status.js";
import { type ActionExecutor, type ExecutedAction, executionContext, failedCompletion } from "./action-executor.js";
import { RemoteCas } from "./remote-cas.js";
import { UploadingExecutor } from "./uploading-executor.js";

let farm: TestFarm;
let cas: RemoteCas;
let dir: string;

before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address);
  dir = await mkdtemp(join(tmpdir(), "berth-uploading-"));
});
after(async () => {
  cas?.close();
  await farm?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A tiny real executor whose outputs are the given blobs, run by a hostile action that may change them late. */
class OutputsExecutor implements ActionExecutor {
  constructor(
    private readonly blobs: LocalBlob[],
    private readonly afterHashing: () => Promise<void> = async () => {},
  ) {}
  async execute(assignment: Assignment): Promise<ExecutedAction> {
    await this.afterHashing();
    return { completion: failedCompletion(assignment.leaseId, new StatusError(Code.OK, "")), pending: this.blobs };
  }
}

test("every blob the result names that did not go inline is in the CAS before the completion is sent", async () => {
  const data = Buffer.from(`in memory ${Date.now()}\n`);
  const fileData = Buffer.alloc(200_000, `on disk ${Date.now()}`);
  await writeFile(join(dir, "big"), fileData);
  const blobs: LocalBlob[] = [
    { digest: await digestOf(SHA256, data), data },
    { digest: await digestOf(SHA256, fileData), path: join(dir, "big") },
  ];
  assert.equal((await cas.findMissing(blobs.map((b) => b.digest))).length, 2);
  const context = executionContext(dir, new AbortController().signal);
  const { pending } = await new UploadingExecutor(new OutputsExecutor(blobs), cas).execute(
    Assignment.fromPartial({ leaseId: "l", instanceName: "" }),
    context,
  );
  assert.deepEqual(pending, []);
  assert.deepEqual(await cas.findMissing(blobs.map((b) => b.digest)), []);
  assert.ok(context.metadata.outputUploadCompletedTimestamp);
});

test("an output changed after it was hashed is refused by the CAS: the execution fails, naming no blob it lacks", async () => {
  const honest = Buffer.alloc(100_000, "honest");
  const path = join(dir, "swapped");
  await writeFile(path, honest);
  const digest = await digestOf(SHA256, honest);
  const executor = new UploadingExecutor(
    new OutputsExecutor([{ digest, path }], () => writeFile(path, Buffer.alloc(100_000, "forged"))),
    cas,
  );
  const context = executionContext(dir, new AbortController().signal);
  await assert.rejects(executor.execute(Assignment.fromPartial({ leaseId: "l" }), context));
  assert.equal(context.metadata.outputUploadCompletedTimestamp, undefined);
  assert.deepEqual(await cas.findMissing([digest]), [digest], "nothing was stored under the honest digest");
});
