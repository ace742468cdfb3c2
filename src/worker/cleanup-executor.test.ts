import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, readdir, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { waitFor } from "../../test/support/wait.js";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Code, StatusError } from "../status/status.js";
import {
  type ActionExecutor,
  type ExecutedAction,
  type ExecutionContext,
  executionContext,
  failedCompletion,
} from "./action-executor.js";
import { CleanupExecutor } from "./cleanup-executor.js";
import { Trash } from "./trash.js";

/**
 * A tiny real executor that leaves what a hostile action leaves: a directory
 * it closed (mode 000) full of files, a symlink to a file outside that must
 * survive, and bytes it says it wrote.
 */
class LitteringExecutor implements ActionExecutor {
  constructor(
    private readonly outside: string,
    private readonly fail: boolean,
  ) {}
  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const closed = join(context.directory, "root", "closed");
    await mkdir(closed, { recursive: true });
    for (let i = 0; i < 20; i++) await writeFile(join(closed, `f${i}`), "x");
    await chmod(closed, 0o000);
    await symlink(this.outside, join(context.directory, "root", "link"));
    context.writtenBytes += 20;
    if (this.fail) throw new StatusError(Code.INTERNAL, "upload failed");
    return { completion: failedCompletion(assignment.leaseId, new StatusError(Code.OK, "")), pending: [] };
  }
}

async function setUp(t: TestContext) {
  const dir = await mkdtemp(join(tmpdir(), "berth-cleanup-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const outside = join(dir, "precious");
  await writeFile(outside, "keep\n");
  const trash = await Trash.open(join(dir, "trash"));
  return { dir, outside, trash };
}

for (const fail of [false, true]) {
  test(`the action's directory goes, closed directories and all, after ${fail ? "a failed" : "a successful"} execution; what its links lead to stays`, async (t) => {
    const { dir, outside, trash } = await setUp(t);
    const context = executionContext(join(dir, "actions", "lease"), new AbortController().signal);
    const executor = new CleanupExecutor(new LitteringExecutor(outside, fail), trash);
    const run = executor.execute(Assignment.fromPartial({ leaseId: "lease" }), context);
    if (fail) await assert.rejects(run, { code: Code.INTERNAL });
    else await run;
    // The directory is moved into the trash once the execution is over (not awaited by it), then removed.
    await waitFor("the trash to be emptied", async () => {
      await trash.drain();
      return (await readdir(join(dir, "trash"))).length === 0 ? true : undefined;
    });
    assert.equal(existsSync(context.directory), false);
    assert.equal(existsSync(outside), true);
  });
}
