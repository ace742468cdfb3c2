import type { BlobStore } from "../cas/blob-store.js";
import { parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** What a client asked to receive inline with a result (GetActionResult, Execute). */
export interface InlineRequest {
  inlineStdout: boolean;
  inlineStderr: boolean;
  inlineOutputFiles: readonly string[];
}

/**
 * Copies the requested small blobs into the result, within `budgetBytes` in
 * total; what does not fit stays a digest only, which the protocol allows.
 */
export async function inlineOutputs(
  fn: DigestFunction,
  result: ActionResult,
  request: InlineRequest,
  cas: BlobStore,
  budgetBytes: number,
): Promise<ActionResult> {
  let budget = budgetBytes;
  const fetch = async (
    wire: { hash: string; sizeBytes: number } | undefined,
    field: string,
  ): Promise<Buffer | undefined> => {
    if (!wire || wire.sizeBytes > budget) return undefined;
    const data = await cas.get(parseDigest(fn, wire, field));
    if (data) budget -= data.byteLength;
    return data;
  };
  const out: ActionResult = { ...result };
  if (request.inlineStdout) out.stdoutRaw = (await fetch(result.stdoutDigest, "stdout_digest")) ?? Buffer.alloc(0);
  if (request.inlineStderr) out.stderrRaw = (await fetch(result.stderrDigest, "stderr_digest")) ?? Buffer.alloc(0);
  if (request.inlineOutputFiles.length > 0) {
    const wanted = new Set(request.inlineOutputFiles);
    out.outputFiles = [];
    for (const file of result.outputFiles) {
      const contents = wanted.has(file.path) ? await fetch(file.digest, "output_files.digest") : undefined;
      out.outputFiles.push(contents ? { ...file, contents } : file);
    }
  }
  return out;
}
