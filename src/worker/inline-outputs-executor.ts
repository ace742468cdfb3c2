import { readFile } from "node:fs/promises";
import type { Assignment, Completion } from "../gen/berth/worker/v1/worker.js";
import { Compressor_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { LocalBlob } from "../merkle/local-tree.js";
import type { ActionExecutor, ExecutedAction, ExecutionContext } from "./action-executor.js";
import type { KeepInMemory } from "./outputs.js";

/**
 * Outputs up to this size, and up to this much in all, go with the
 * completion; the output collection keeps their bytes from the read that
 * hashes them, so they are not read twice.
 */
export const INLINE_LIMITS: KeepInMemory = { blobBytes: 64 * 1024, totalBytes: 1024 * 1024 };

/**
 * Small outputs (stdout, stderr, small files) travel with the completion,
 * which the hub stores before it uses the result, instead of in an upload
 * call of their own: one round trip less for most actions.
 */
export class InlineOutputsExecutor implements ActionExecutor {
  constructor(
    private readonly inner: ActionExecutor,
    private readonly limits: KeepInMemory = INLINE_LIMITS,
  ) {}

  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const { completion, pending } = await this.inner.execute(assignment, context);
    const inline: Completion["inlineBlobs"] = [...completion.inlineBlobs];
    const rest: LocalBlob[] = [];
    let total = inline.reduce((sum, blob) => sum + blob.data.byteLength, 0);
    for (const blob of pending) {
      const size = blob.digest.sizeBytes;
      if (size > this.limits.blobBytes || total + size > this.limits.totalBytes) {
        rest.push(blob);
        continue;
      }
      total += size;
      const data = "data" in blob ? blob.data : await readFile(blob.path);
      inline.push({ digest: { hash: blob.digest.hash, sizeBytes: size }, data, compressor: Compressor_Value.IDENTITY });
    }
    return { completion: { ...completion, inlineBlobs: inline }, pending: rest };
  }
}
