import type { FlagfileLimits } from "../persistent/persistent-action.js";
import type { Runners } from "../runner/runners.js";
import type { ActionEnvironments } from "./action-environments.js";
import type { ActionExecutor } from "./action-executor.js";
import type { ActionInputs } from "./action-inputs.js";
import { CleanupExecutor } from "./cleanup-executor.js";
import { InlineOutputsExecutor } from "./inline-outputs-executor.js";
import { LocalActionExecutor } from "./local-executor.js";
import { TimestampedExecutor } from "./timestamped-executor.js";
import type { Trash } from "./trash.js";
import { UploadingExecutor } from "./uploading-executor.js";

export interface WorkerExecutorParts {
  workerName: string;
  inputs: ActionInputs;
  environments: ActionEnvironments;
  runners: Runners;
  /** Where the action's directory goes when it is done. */
  trash: Trash;
  /** Bounds on the @flagfiles read into a persistent worker's request. */
  flagfileLimits?: FlagfileLimits;
}

/**
 * A worker's executor, from the outside in: timestamps around the whole;
 * the directory discarded after everything else read it; the rest of the
 * outputs uploaded; the small ones put inline first; the action's own steps.
 */
export function workerExecutor(parts: WorkerExecutorParts): ActionExecutor {
  const local = new LocalActionExecutor(parts.inputs, parts.environments, parts.runners, parts.flagfileLimits);
  const uploaded = new UploadingExecutor(new InlineOutputsExecutor(local), parts.inputs.cas);
  return new TimestampedExecutor(new CleanupExecutor(uploaded, parts.trash), parts.workerName);
}
