import { join } from "node:path";
import { DEFAULT_INPUT_TREE_LIMITS } from "../../src/cas/tree-limits.js";
import type { Assignment, Completion } from "../../src/gen/berth/worker/v1/worker.js";
import { BubblewrapRunner } from "../../src/runner/bubblewrap-runner.js";
import { Runners } from "../../src/runner/runners.js";
import { BubblewrapSandbox } from "../../src/sandbox/bubblewrap.js";
import { ActionEnvironments, type ActionEnvironmentsOptions } from "../../src/worker/action-environments.js";
import { executionContext, failedCompletion } from "../../src/worker/action-executor.js";
import type { ActionInputs } from "../../src/worker/action-inputs.js";
import { DirectoryCache } from "../../src/worker/directory-cache.js";
import { failureStatus } from "../../src/worker/failure-status.js";
import { FileCache } from "../../src/worker/file-cache.js";
import { actionUser } from "../../src/worker/local-workers.js";
import type { RemoteCas } from "../../src/worker/remote-cas.js";
import { Trash } from "../../src/worker/trash.js";
import { workerExecutor } from "../../src/worker/worker-executor.js";
import { testUidBase } from "./farm.js";

/** One worker's executor and the parts it is made of, for tests that run assignments without a hub. */
export interface TestExecutor {
  inputs: ActionInputs;
  trash: Trash;
  /** Runs `assignment` as a worker does, failures as the completion the worker would send. */
  run(assignment: Assignment, signal?: AbortSignal): Promise<Completion>;
}

/**
 * A worker's executor built from the same real components a worker builds
 * (file cache, trash and directories below `workDir`, a bubblewrap sandbox
 * for the action's user), with no images unless `environments` adds them.
 */
export async function testExecutor(
  workDir: string,
  cas: RemoteCas,
  environments: Partial<ActionEnvironmentsOptions> = {},
): Promise<TestExecutor> {
  const owner = actionUser(0, testUidBase());
  const inputs: ActionInputs = {
    cas,
    files: await FileCache.open(join(workDir, "cache"), 1024 ** 3, { ownerWrites: process.getuid?.() === 0 }),
    directories: new DirectoryCache(),
    owner: process.getuid?.() === 0 ? owner : undefined,
    limits: DEFAULT_INPUT_TREE_LIMITS,
  };
  const sandbox = new BubblewrapSandbox({ uid: owner.uid, gid: owner.gid });
  const layeredRoots = process.getuid?.() === 0;
  const workerName = "test-worker";
  const trash = await Trash.open(join(workDir, "trash"));
  const executor = workerExecutor({
    workerName,
    inputs,
    environments: new ActionEnvironments({
      workerName,
      images: undefined,
      expandedRoots: undefined,
      inputRootPath: "/run/berth/execroot",
      ...environments,
    }),
    runners: new Runners({ "namespace-sandbox": new BubblewrapRunner(sandbox, { layeredRoots }) }),
    trash,
  });
  return {
    inputs,
    trash,
    run: async (assignment, signal = new AbortController().signal) => {
      const directory = join(workDir, "actions", assignment.leaseId);
      return executor.execute(assignment, executionContext(directory, signal)).then(
        ({ completion }) => completion,
        (err: unknown) => failedCompletion(assignment.leaseId, failureStatus(err, directory)),
      );
    },
  };
}
