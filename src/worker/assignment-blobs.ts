import { checkDirectory } from "../cas/directory-tree.js";
import { digestKey, digestOf, parseDigest, sameDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { DirectoryCache } from "./directory-cache.js";

/**
 * Takes in the parts of the input tree the hub sent with an assignment
 * (Assignment.input_directories and input_files): Directory messages join
 * the worker's directory cache, and file contents are returned by digest key
 * for the file cache to write instead of fetching them. They are a hint, so
 * a blob that does not match its digest or does not decode is dropped, and
 * the worker fetches it from the CAS as if it had not come.
 */
export async function acceptAssignmentBlobs(
  fn: DigestFunction,
  assignment: Pick<Assignment, "inputDirectories" | "inputFiles">,
  directories: DirectoryCache,
): Promise<Map<string, Buffer>> {
  const verified = async (blob: Assignment["inputFiles"][number]) => {
    try {
      const digest = parseDigest(fn, blob.digest, "input blob");
      return sameDigest(await digestOf(fn, blob.data), digest) ? digest : undefined;
    } catch {
      return undefined;
    }
  };
  await Promise.all(
    assignment.inputDirectories.map(async (blob) => {
      const digest = await verified(blob);
      if (!digest || directories.get(digestKey(digest))) return;
      try {
        const directory = Directory.decode(blob.data);
        checkDirectory(directory, digest);
        directories.set(digestKey(digest), directory);
      } catch {
        // Fetched and checked again from the CAS, where the error is reported.
      }
    }),
  );
  const files = new Map<string, Buffer>();
  await Promise.all(
    assignment.inputFiles.map(async (blob) => {
      const digest = await verified(blob);
      if (digest) files.set(digestKey(digest), blob.data);
    }),
  );
  return files;
}
