import type { Assignment, Completion } from "../gen/berth/worker/v1/worker.js";
import type { ExecutedActionMetadata } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { LocalBlob } from "../merkle/local-tree.js";
import { toRpcStatus } from "../status/rpc-status.js";
import type { StatusError } from "../status/status.js";

/**
 * Runs one assignment and says how it went. The worker's path of one action
 * is a LocalActionExecutor (lay out inputs, prepare the environment, run,
 * collect outputs) inside wrappers that each add one thing: timestamps,
 * the action directory's removal, uploads, inline outputs (see
 * worker-executor.ts for the order).
 *
 * It rejects when the action could not run or its outputs could not be
 * stored (missing inputs, an image that cannot be pulled, …): the caller
 * turns that into a failed completion. A command that ran resolves, whatever
 * its exit code; a timeout or a limit resolves too, with its status.
 */
export interface ActionExecutor {
  execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction>;
}

/** What one execution carries besides the assignment, made by the worker for it. */
export interface ExecutionContext {
  /** Aborted when the hub cancels the action or the stream breaks. */
  signal: AbortSignal;
  /** The action's own directory (made ahead by ActionDirectories, else by the local executor; removed by the cleanup wrapper). */
  directory: string;
  /** Stamped by the steps and wrappers as they go; the result's execution_metadata is this object. */
  metadata: ExecutedActionMetadata;
  /** What the directory holds beyond hard links to the file cache (outputs, logs), as the steps counted it. */
  writtenBytes: number;
  /**
   * Called once the outputs are sent, before the directory goes (see
   * CleanupExecutor): what a step lent the action until then, such as a warm
   * runner's workspace its outputs are read from, is given back.
   */
  afterOutputs: (() => Promise<void>)[];
}

/** A completion, and the blobs its result names that have not been sent yet (the upload wrapper sends them). */
export interface ExecutedAction {
  completion: Completion;
  pending: LocalBlob[];
}

/** A context for one assignment whose directory is `directory`, with empty metadata. */
export function executionContext(directory: string, signal: AbortSignal): ExecutionContext {
  return {
    signal,
    directory,
    writtenBytes: 0,
    afterOutputs: [],
    metadata: {
      worker: "",
      queuedTimestamp: undefined,
      workerStartTimestamp: undefined,
      workerCompletedTimestamp: undefined,
      inputFetchStartTimestamp: undefined,
      inputFetchCompletedTimestamp: undefined,
      executionStartTimestamp: undefined,
      executionCompletedTimestamp: undefined,
      virtualExecutionDuration: undefined,
      outputUploadStartTimestamp: undefined,
      outputUploadCompletedTimestamp: undefined,
      auxiliaryMetadata: [],
    },
  };
}

/** A completion for an assignment that could not run. */
export function failedCompletion(leaseId: string, error: StatusError): Completion {
  return { leaseId, status: toRpcStatus(error), result: undefined, inlineBlobs: [], digestFunction: 0 };
}
