import { checkRelativePath } from "../action/output-path.js";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestOf, formatDigest, parseDigest, verifyBlob } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument, missingBlobs } from "../status/status.js";
import { missingReferences } from "./referenced-blobs.js";

/**
 * Checks an ActionResult a client wants to store and returns the form
 * that is stored: data sent inline is moved into the CAS (and dropped from
 * the entry), and every blob the entry names must then be present.
 */
export async function prepareResultForStorage(
  fn: DigestFunction,
  result: ActionResult,
  cas: BlobStore,
): Promise<ActionResult> {
  const stored: ActionResult = { ...result };
  checkOutputPaths(result);
  stored.outputFiles = await Promise.all(
    result.outputFiles.map(async (file, i) => {
      const field = `action_result.output_files[${i}]`;
      const digest = parseDigest(fn, file.digest, `${field}.digest`);
      if (file.contents.byteLength > 0) {
        await verifyBlob(digest, file.contents, `${field}.contents`);
        await cas.put(digest, file.contents);
      }
      return { ...file, contents: Buffer.alloc(0) };
    }),
  );
  stored.stdoutDigest = await moveInline(fn, result.stdoutRaw, result.stdoutDigest, "action_result.stdout", cas);
  stored.stderrDigest = await moveInline(fn, result.stderrRaw, result.stderrDigest, "action_result.stderr", cas);
  stored.stdoutRaw = Buffer.alloc(0);
  stored.stderrRaw = Buffer.alloc(0);
  for (const [i, symlink] of [
    ...result.outputSymlinks,
    ...result.outputFileSymlinks,
    ...result.outputDirectorySymlinks,
  ].entries()) {
    if (symlink.target === "") throw invalidArgument(`action_result symlink ${i} (${symlink.path})`, "target is empty");
  }
  const missing = await missingReferences(fn, stored, cas);
  if (missing.length > 0) {
    throw missingBlobs(missing.map((ref) => `blobs/${formatDigest(ref.digest)}`));
  }
  return stored;
}

async function moveInline(
  fn: DigestFunction,
  raw: Buffer,
  wireDigest: { hash: string; sizeBytes: number } | undefined,
  field: string,
  cas: BlobStore,
): Promise<{ hash: string; sizeBytes: number } | undefined> {
  if (raw.byteLength === 0) {
    if (wireDigest) parseDigest(fn, wireDigest, `${field}_digest`);
    return wireDigest;
  }
  let digest: Digest;
  if (wireDigest) {
    digest = parseDigest(fn, wireDigest, `${field}_digest`);
    await verifyBlob(digest, raw, `${field}_raw`);
  } else {
    digest = await digestOf(fn, raw);
  }
  await cas.put(digest, raw);
  return { hash: digest.hash, sizeBytes: digest.sizeBytes };
}

function checkOutputPaths(result: ActionResult): void {
  const seen = new Map<string, string>();
  const check = (path: string, field: string) => {
    checkRelativePath(path, field);
    const earlier = seen.get(path);
    if (earlier) throw invalidArgument(field, `path "${path}" is also named by ${earlier}`);
    seen.set(path, field);
  };
  for (const [i, f] of result.outputFiles.entries()) check(f.path, `action_result.output_files[${i}].path`);
  for (const [i, d] of result.outputDirectories.entries()) {
    // An output directory may be the working directory itself.
    if (d.path !== "") check(d.path, `action_result.output_directories[${i}].path`);
  }
  for (const [i, s] of result.outputSymlinks.entries()) check(s.path, `action_result.output_symlinks[${i}].path`);
  for (const [i, s] of result.outputFileSymlinks.entries()) {
    checkRelativePath(s.path, `action_result.output_file_symlinks[${i}].path`);
  }
  for (const [i, s] of result.outputDirectorySymlinks.entries()) {
    checkRelativePath(s.path, `action_result.output_directory_symlinks[${i}].path`);
  }
}
