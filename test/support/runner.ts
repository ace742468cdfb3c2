import { join } from "node:path";
import { BubblewrapSandbox } from "../../src/sandbox/bubblewrap.js";
import type { ActionRunnerOptions } from "../../src/worker/action-runner.js";
import { DirectoryCache } from "../../src/worker/directory-cache.js";
import { FileCache } from "../../src/worker/file-cache.js";
import { actionUser } from "../../src/worker/local-workers.js";
import type { RemoteCas } from "../../src/worker/remote-cas.js";
import { Trash } from "../../src/worker/trash.js";
import { testUidBase } from "./farm.js";

/**
 * What a worker gives runAction, built from the same real components a worker
 * builds (file cache, trash and directories below `workDir`, a bubblewrap
 * sandbox for the action's user), with no images unless `overrides` adds them.
 */
export async function actionRunnerOptions(
  workDir: string,
  cas: RemoteCas,
  overrides: Partial<ActionRunnerOptions> = {},
): Promise<ActionRunnerOptions> {
  const owner = actionUser(0, testUidBase());
  return {
    workerName: "test-worker",
    workDir: join(workDir, "actions"),
    cas,
    cache: await FileCache.open(join(workDir, "cache"), 1024 ** 3, { ownerWrites: process.getuid?.() === 0 }),
    images: undefined,
    expandedRoots: undefined,
    inputRootPath: "/run/berth/execroot",
    trash: await Trash.open(join(workDir, "trash")),
    directories: new DirectoryCache(),
    sandbox: new BubblewrapSandbox({ uid: owner.uid, gid: owner.gid }),
    owner: process.getuid?.() === 0 ? owner : undefined,
    ...overrides,
  };
}
