import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { StoredBlob } from "../scheduler/scheduler.js";

/** How much of an input tree travels with an assignment. */
export interface StoredBlobLimits {
  /** Directory messages, counted from the root breadth first. */
  maxDirectories: number;
  /** Files larger than this are left to the worker's file cache and the CAS. */
  maxFileBytes: number;
  /** Bytes of Directory messages and files together. */
  maxTotalBytes: number;
}

/**
 * Enough for the input roots of most compile and genrule actions, small
 * enough that an assignment stays a cheap message when the worker already
 * holds the files.
 */
export const DEFAULT_INPUT_BLOB_LIMITS: StoredBlobLimits = {
  maxDirectories: 256,
  maxFileBytes: 16 * 1024,
  maxTotalBytes: 256 * 1024,
};

/**
 * The Directory messages and small files of the tree at `root` that fit in
 * `limits`, read from the CAS the client has just filled (so mostly from its
 * memory cache). A worker given them lays out a small input root without
 * asking the CAS: the two round trips it saves (GetTree, then a batch read
 * of the files) cost more per action on a busy farm than the reads here.
 * What is absent or does not decode is skipped, not reported: the worker
 * finds and reports missing or malformed inputs as it always does.
 */
export async function inputTreeBlobs(
  fn: DigestFunction,
  cas: BlobStore,
  root: Digest,
  limits: StoredBlobLimits = DEFAULT_INPUT_BLOB_LIMITS,
): Promise<{ directories: StoredBlob[]; files: StoredBlob[] }> {
  const directories: StoredBlob[] = [];
  const wantedFiles = new Map<string, Digest>();
  const seen = new Set<string>([digestKey(root)]);
  let budget = limits.maxTotalBytes;
  let level: Digest[] = [root];
  while (level.length > 0 && directories.length < limits.maxDirectories) {
    // Chosen by the sizes their digests state, before reading: no more than the budget is ever read.
    const wanted: Digest[] = [];
    let wantedBytes = 0;
    for (const digest of level) {
      if (wanted.length >= limits.maxDirectories - directories.length) break;
      if (wantedBytes + digest.sizeBytes > budget) continue;
      wanted.push(digest);
      wantedBytes += digest.sizeBytes;
    }
    if (wanted.length === 0) break;
    const read = await Promise.all(wanted.map((digest) => cas.get(digest)));
    const next: Digest[] = [];
    for (const [i, data] of read.entries()) {
      if (data === undefined || data.byteLength > budget) continue;
      const directory = decodeDirectory(data);
      if (directory === undefined) continue;
      budget -= data.byteLength;
      directories.push({ digest: wanted[i] as Digest, data });
      for (const file of directory.files) {
        const digest = digestOrUndefined(fn, file.digest);
        if (digest && digest.sizeBytes > 0 && digest.sizeBytes <= limits.maxFileBytes) {
          wantedFiles.set(digestKey(digest), digest);
        }
      }
      for (const child of directory.directories) {
        const digest = digestOrUndefined(fn, child.digest);
        if (digest && !seen.has(digestKey(digest))) {
          seen.add(digestKey(digest));
          next.push(digest);
        }
      }
    }
    level = next;
  }
  const chosen: Digest[] = [];
  for (const digest of wantedFiles.values()) {
    if (digest.sizeBytes > budget) continue;
    budget -= digest.sizeBytes;
    chosen.push(digest);
  }
  const data = await Promise.all(chosen.map((digest) => cas.get(digest)));
  const files: StoredBlob[] = [];
  for (const [i, bytes] of data.entries()) if (bytes) files.push({ digest: chosen[i] as Digest, data: bytes });
  return { directories, files };
}

function decodeDirectory(data: Buffer): Directory | undefined {
  try {
    return Directory.decode(data);
  } catch {
    return undefined;
  }
}

function digestOrUndefined(
  fn: DigestFunction,
  raw: { hash: string; sizeBytes: number } | undefined,
): Digest | undefined {
  try {
    return parseDigest(fn, raw, "digest");
  } catch {
    return undefined;
  }
}
