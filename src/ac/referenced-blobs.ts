import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { type ActionResult, type Directory, Tree } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** A blob an action result depends on, with where it is named (for messages). */
export interface ReferencedBlob {
  digest: Digest;
  field: string;
}

/** Blobs named directly by the result: files, stdout/stderr, trees. */
export function directReferences(fn: DigestFunction, result: ActionResult): ReferencedBlob[] {
  const refs: ReferencedBlob[] = [];
  result.outputFiles.forEach((file, i) => {
    refs.push({
      digest: parseDigest(fn, file.digest, `output_files[${i}].digest`),
      field: `output_files[${i}] (${file.path})`,
    });
  });
  result.outputDirectories.forEach((dir, i) => {
    refs.push({
      digest: parseDigest(fn, dir.treeDigest, `output_directories[${i}].tree_digest`),
      field: `output_directories[${i}] (${dir.path})`,
    });
  });
  if (result.stdoutDigest)
    refs.push({ digest: parseDigest(fn, result.stdoutDigest, "stdout_digest"), field: "stdout_digest" });
  if (result.stderrDigest)
    refs.push({ digest: parseDigest(fn, result.stderrDigest, "stderr_digest"), field: "stderr_digest" });
  return refs;
}

/**
 * Every blob the result needs for a client to download all of it, including
 * the files inside output directory trees. Trees that are themselves missing
 * are reported as missing; their contents cannot be listed.
 */
export async function missingReferences(
  fn: DigestFunction,
  result: ActionResult,
  cas: BlobStore,
): Promise<ReferencedBlob[]> {
  const direct = directReferences(fn, result);
  const missing = await missingOf(direct, cas);
  const missingKeys = new Set(missing.map((ref) => ref.digest));
  const nested: ReferencedBlob[] = [];
  for (const [i, dir] of result.outputDirectories.entries()) {
    const treeRef = direct.find((ref) => ref.field.startsWith(`output_directories[${i}]`));
    if (!treeRef || missingKeys.has(treeRef.digest)) continue;
    const bytes = await cas.get(treeRef.digest);
    if (!bytes) {
      missing.push(treeRef);
      continue;
    }
    const tree = Tree.decode(bytes);
    const dirs: Directory[] = tree.root ? [tree.root, ...tree.children] : tree.children;
    for (const d of dirs) {
      for (const file of d.files) {
        nested.push({ digest: parseDigest(fn, file.digest, "tree file"), field: `${dir.path}/…/${file.name}` });
      }
    }
  }
  missing.push(...(await missingOf(nested, cas)));
  return missing;
}

async function missingOf(refs: ReferencedBlob[], cas: BlobStore): Promise<ReferencedBlob[]> {
  if (refs.length === 0) return [];
  const absent = new Set(await cas.findMissing(refs.map((ref) => ref.digest)));
  return refs.filter((ref) => absent.has(ref.digest));
}
