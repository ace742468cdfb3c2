import { checkDirectory } from "../cas/directory-tree.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { type Digest, digestKey, digestOf, parseDigest, sameDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { DirectoryCache } from "./directory-cache.js";
import type { BlobsAtHand } from "./file-cache.js";

/**
 * Takes in the parts of the input tree the hub sent with an assignment
 * (Assignment.input_directories and input_files): Directory messages join
 * the worker's directory cache, and file contents are returned for the file
 * cache to write instead of fetching them, each checked against its digest
 * only when the cache asks for it (a worker holds most of an action's files
 * already, and hashing those again was work for nothing). They are a hint,
 * so a blob that does not match its digest or does not decode is dropped,
 * and the worker fetches it from the CAS as if it had not come. So is a
 * Directory of more than `maxDirectoryBytes` (the worker's
 * inputLimits.maxDirectoryBytes): fetching it is refused with the limit's
 * name, and neither hashing nor decoding it costs the worker anything first.
 */
export async function acceptAssignmentBlobs(
  fn: DigestFunction,
  assignment: Pick<Assignment, "inputDirectories" | "inputFiles">,
  directories: DirectoryCache,
  maxDirectoryBytes = DEFAULT_INPUT_TREE_LIMITS.maxDirectoryBytes,
): Promise<BlobsAtHand> {
  type Blob = Assignment["inputFiles"][number];
  const named = (blob: Blob) => {
    try {
      return parseDigest(fn, blob.digest, "input blob");
    } catch {
      return undefined;
    }
  };
  const matches = async (blob: Blob, digest: Digest) => sameDigest(await digestOf(fn, blob.data), digest);
  await Promise.all(
    assignment.inputDirectories.map(async (blob) => {
      const digest = named(blob);
      if (!digest || blob.data.byteLength > maxDirectoryBytes) return;
      // A Directory the worker already holds (the common case for all but the deepest levels) is not hashed.
      if (directories.get(digestKey(digest)) || !(await matches(blob, digest))) return;
      try {
        const directory = Directory.decode(blob.data);
        checkDirectory(directory, digest);
        directories.set(digestKey(digest), directory, blob.data.byteLength);
      } catch {
        // Fetched and checked again from the CAS, where the error is reported.
      }
    }),
  );
  const sent = new Map<string, Buffer>();
  for (const blob of assignment.inputFiles) {
    const digest = named(blob);
    if (digest) sent.set(digestKey(digest), blob.data);
  }
  const checked = new Map<string, Promise<Buffer | undefined>>();
  return {
    get(digest) {
      const key = digestKey(digest);
      const data = sent.get(key);
      if (data === undefined) return Promise.resolve(undefined);
      let check = checked.get(key);
      if (check === undefined) {
        check = digestOf(fn, data).then((actual) => (sameDigest(actual, digest) ? data : undefined));
        checked.set(key, check);
      }
      return check;
    },
  };
}
