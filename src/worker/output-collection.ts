import type { Completion } from "../gen/berth/worker/v1/worker.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Status } from "../gen/google/rpc/status.js";
import { fileBlob, type LocalBlob } from "../merkle/local-tree.js";
import type { RunResult } from "../runner/runner.js";
import { toRpcStatus } from "../status/rpc-status.js";
import { Code } from "../status/status.js";
import type { ExecutedAction, ExecutionContext } from "./action-executor.js";
import type { ActionRequest } from "./action-request.js";
import type { ContainedRootOptions } from "./contained-path.js";
import { INLINE_LIMITS } from "./inline-outputs-executor.js";
import { collectOutputs, lstatOrUndefined, type RefusedOutput, refusedOutputsError } from "./outputs.js";

/** Where one run left what it made. */
export interface RunFiles {
  inputRoot: string;
  stdoutPath: string;
  stderrPath: string;
}

/**
 * The completion of a command that ran: its outputs, stdout and stderr as a
 * result naming them (all still to be sent), and its status. A result that is
 * not OK (timeout, limit, refused outputs) still goes along for the client to
 * see; its status keeps it out of the action cache.
 */
export async function collectRunOutputs(
  request: ActionRequest,
  files: RunFiles,
  view: ContainedRootOptions,
  run: RunResult,
  context: ExecutionContext,
): Promise<ExecutedAction> {
  const { fn, command, workingDirectory } = request;
  // Read only now that nothing of the action runs (see contained-path.ts).
  const where = { inputRoot: files.inputRoot, workingDirectory, view };
  const outputs = await collectOutputs(fn, command, where, INLINE_LIMITS);
  const stdout = await logBlob(request, files.stdoutPath);
  const stderr = await logBlob(request, files.stderrPath);
  const pending: LocalBlob[] = [...outputs.uploads, ...(stdout ? [stdout] : []), ...(stderr ? [stderr] : [])];
  for (const blob of pending) context.writtenBytes += blob.digest.sizeBytes;
  const { uploads: _, refused, ...fields } = outputs;
  const wire = (blob: LocalBlob | undefined) => blob && { hash: blob.digest.hash, sizeBytes: blob.digest.sizeBytes };
  const result: ActionResult = {
    ...fields,
    exitCode: run.exitCode,
    stdoutRaw: Buffer.alloc(0),
    stdoutDigest: wire(stdout),
    stderrRaw: Buffer.alloc(0),
    stderrDigest: wire(stderr),
    executionMetadata: context.metadata,
  };
  const completion: Completion = {
    leaseId: request.leaseId,
    status: runStatus(run, refused, request.timeoutMs),
    result,
    inlineBlobs: [],
    digestFunction: fn.wireValue,
  };
  return { completion, pending };
}

/** stdout or stderr as a blob (read once when small enough to go inline), or undefined when empty. */
async function logBlob(request: ActionRequest, path: string): Promise<LocalBlob | undefined> {
  const info = lstatOrUndefined(path);
  if (!info || info.size === 0) return undefined;
  return (await fileBlob(request.fn, path, INLINE_LIMITS.blobBytes)).blob;
}

/**
 * Why a command that ran did not succeed as far as the farm is concerned: its timeout, a limit of the farm's
 * (like a timeout, not the action's own doing), or outputs it named that lead out of its input root.
 */
function runStatus(run: RunResult, refused: readonly RefusedOutput[], timeoutMs: number): Status {
  if (run.timedOut) {
    const seconds = timeoutMs / 1000;
    return {
      code: Code.DEADLINE_EXCEEDED,
      message: `the action ran past its timeout of ${seconds} s and was killed`,
      details: [],
    };
  }
  if (run.limitReached) return { code: Code.RESOURCE_EXHAUSTED, message: run.limitReached.message, details: [] };
  if (refused.length > 0) return toRpcStatus(refusedOutputsError(refused));
  return { code: Code.OK, message: "", details: [] };
}
