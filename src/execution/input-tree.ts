import type { BlobStore } from "../cas/blob-store.js";
import { checkDirectory } from "../cas/directory-tree.js";
import { blobBatches, checkMessageSize, MAX_DIRECTORY_BYTES_IN_FLIGHT } from "../cas/message-size.js";
import {
  checkTreeLimits,
  INPUT_TREE_LIMIT_KEYS,
  type InputTreeLimits,
  inputLimitExceeded,
  type SubtreeTotals,
  type TreeTotals,
} from "../cas/tree-limits.js";
import { type Digest, digestKey, formatDigest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, invalidArgument, missingBlobs, StatusError } from "../status/status.js";
import type { CheckedDirectories, CheckedDirectory } from "./checked-directories.js";

/** Directory messages read from the CAS at once (and at most MAX_DIRECTORY_BYTES_IN_FLIGHT bytes of them). */
const READ_CONCURRENCY = 64;

/**
 * Reads every distinct Directory of the input tree at `root` from the CAS,
 * level by level (no recursion), checks each one's names, and checks the
 * tree against `limits` before the action is queued. Refusals: a missing
 * Directory is FAILED_PRECONDITION with MISSING violations (all of them at
 * once), a malformed one or a bad name INVALID_ARGUMENT naming it, a limit
 * FAILED_PRECONDITION naming the limit and its configuration key. Reading
 * stops as soon as the distinct messages or the levels pass their limits, so
 * a hostile tree costs at most maxDirectoryBlobs reads; a Directory whose
 * digest says it is over maxDirectoryBytes is refused before it is read, and
 * at most MAX_DIRECTORY_BYTES_IN_FLIGHT bytes are read at once.
 *
 * With `checked`, Directory messages an earlier call accepted are neither
 * read nor checked again: their children come from the memory, their
 * subtree's totals too, and only their presence is asked of the CAS (in one
 * findMissing, which also counts them as used), so a Directory evicted since
 * is still reported missing. Every limit is still compared with the whole
 * tree's totals: a remembered subtree only saves the work below it.
 */
export async function checkInputTree(
  fn: DigestFunction,
  cas: BlobStore,
  root: Digest,
  limits: InputTreeLimits,
  checked?: CheckedDirectories,
): Promise<TreeTotals> {
  const directories = new Map<string, Directory>();
  // The children of each Directory read now, parsed, to remember them once the whole tree passed.
  const childrenRead = new Map<string, { name: string; digest: Digest }[]>();
  // Remembered directories met in this tree: their blobs' presence is asked for at the end.
  const known = new Map<string, CheckedDirectory>();
  const knownDigests: Digest[] = [];
  const seen = new Set<string>([digestKey(root)]);
  // The first path each directory was found at, to name it in refusals.
  const paths = new Map<string, string>([[digestKey(root), ""]]);
  const missing: Digest[] = [];
  // Each distinct Directory appears at least once in the expanded tree: past maxEntries here, reading can stop.
  let distinctEntries = 0;
  // Bytes of the distinct Directory messages, from their digests: past the limit, nothing more is read.
  let directoryBytes = 0;
  const countDirectory = (digest: Digest) => {
    directoryBytes += digest.sizeBytes;
    if (directoryBytes > limits.maxTotalDirectoryBytes) {
      throw inputLimitExceeded(
        "maxTotalDirectoryBytes",
        limits,
        `has more than ${limits.maxTotalDirectoryBytes} bytes of Directory messages`,
      );
    }
  };
  countDirectory(root);
  let level: Digest[] = [root];
  for (let depth = 0; level.length > 0; depth++) {
    // The shortest path to a directory is never longer than the deepest: past the limit here is past it for good.
    if (depth > limits.maxDepth) {
      throw inputLimitExceeded("maxDepth", limits, `is more than ${limits.maxDepth} directories deep`);
    }
    const next: Digest[] = [];
    const visit = (path: string, ownEntries: number, children: readonly { name: string; digest: Digest }[]) => {
      distinctEntries += ownEntries;
      if (distinctEntries > limits.maxEntries) {
        throw inputLimitExceeded("maxEntries", limits, `has more than ${limits.maxEntries} entries`);
      }
      for (const child of children) {
        const key = digestKey(child.digest);
        if (seen.has(key)) continue;
        seen.add(key);
        paths.set(key, path === "" ? child.name : `${path}/${child.name}`);
        if (seen.size > limits.maxDirectoryBlobs) {
          throw inputLimitExceeded(
            "maxDirectoryBlobs",
            limits,
            `has more than ${limits.maxDirectoryBlobs} distinct Directory messages`,
          );
        }
        countDirectory(child.digest);
        next.push(child.digest);
      }
    };
    const toRead: Digest[] = [];
    for (const digest of level) {
      const key = digestKey(digest);
      const remembered = checked?.get(key);
      if (!remembered) {
        toRead.push(digest);
        continue;
      }
      known.set(key, remembered);
      knownDigests.push(digest);
      visit(paths.get(key) ?? "", remembered.ownEntries, remembered.children);
    }
    for (const digest of toRead) {
      const path = paths.get(digestKey(digest)) ?? "";
      checkMessageSize(digest, limits.maxDirectoryBytes, describePath(path), INPUT_TREE_LIMIT_KEYS.maxDirectoryBytes);
    }
    for (const batch of blobBatches(toRead, READ_CONCURRENCY, MAX_DIRECTORY_BYTES_IN_FLIGHT)) {
      const read = await Promise.all(batch.map((digest) => cas.get(digest)));
      for (const [i, bytes] of read.entries()) {
        const digest = batch[i] as Digest;
        if (!bytes) {
          missing.push(digest);
          continue;
        }
        const key = digestKey(digest);
        const path = paths.get(key) ?? "";
        const directory = atPath(path, () => {
          const decoded = decodeDirectory(bytes, digest);
          checkDirectory(decoded, digest);
          return decoded;
        });
        directories.set(key, directory);
        const children = directory.directories.map((child, j) => ({
          name: child.name,
          digest: parseDigest(fn, child.digest, `directory ${formatDigest(digest)} directories[${j}].digest`),
        }));
        if (checked) childrenRead.set(key, children);
        visit(path, ownEntriesOf(directory), children);
      }
    }
    level = next;
  }
  if (knownDigests.length > 0) missing.push(...(await cas.findMissing(knownDigests)));
  if (missing.length > 0) throw missingBlobs(missing.map((d) => `blobs/${formatDigest(d)}`));
  const measured = new Map<string, SubtreeTotals>();
  const totals = checkTreeLimits(fn, root, (key) => directories.get(key), limits, {
    known: (key) => known.get(key),
    onMeasured: checked ? (key, subtree) => measured.set(key, subtree) : undefined,
  });
  // Only once the whole tree passed: every Directory measured now was read, valid and acyclic.
  if (checked) {
    for (const [key, subtree] of measured) {
      const directory = directories.get(key) as Directory;
      checked.remember(key, {
        totals: subtree,
        children: childrenRead.get(key) ?? [],
        ownEntries: ownEntriesOf(directory),
      });
    }
  }
  return totals;
}

function ownEntriesOf(directory: Directory): number {
  return directory.files.length + directory.directories.length + directory.symlinks.length;
}

/** Runs `check`, naming the input directory at `path` in an INVALID_ARGUMENT it throws. */
function atPath<T>(path: string, check: () => T): T {
  try {
    return check();
  } catch (err) {
    if (!(err instanceof StatusError) || err.code !== Code.INVALID_ARGUMENT) throw err;
    throw new StatusError(Code.INVALID_ARGUMENT, `${describePath(path)}: ${err.message}`, err.details);
  }
}

/** The input directory at `path` as refusals name it. */
function describePath(path: string): string {
  return path === "" ? "the input root" : `input directory "${path.length > 200 ? `…${path.slice(-200)}` : path}"`;
}

function decodeDirectory(bytes: Buffer, digest: Digest): Directory {
  try {
    return Directory.decode(bytes);
  } catch (err) {
    throw invalidArgument(`directory ${formatDigest(digest)}`, `is not a Directory message: ${(err as Error).message}`);
  }
}
