import { type Digest, digestKey, formatDigest, parseDigest } from "../digest/digest.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument, notFound } from "../status/status.js";
import type { BlobStore } from "./blob-store.js";
import { checkMessageSize } from "./message-size.js";
import { DEFAULT_INPUT_TREE_LIMITS, INPUT_TREE_LIMIT_KEYS } from "./tree-limits.js";

export interface TreePage {
  directories: Directory[];
  /** Where the next page starts, or undefined on the last page. */
  nextOffset: number | undefined;
}

/**
 * One page of the directories below `root`, breadth first, each distinct
 * directory once. Subtrees missing from the CAS are left out, as the
 * protocol asks; a missing root is NOT_FOUND. A page ends after `pageSize`
 * directories or `maxBytes` of encoded directories, whichever comes first.
 * A Directory whose digest says it is over `maxDirectoryBytes` is refused
 * (FAILED_PRECONDITION naming the limit) before it is read.
 */
export async function readTreePage(
  cas: BlobStore,
  root: Digest,
  offset: number,
  pageSize: number,
  maxBytes: number,
  maxDirectoryBytes = DEFAULT_INPUT_TREE_LIMITS.maxDirectoryBytes,
): Promise<TreePage> {
  const seen = new Set<string>([digestKey(root)]);
  const queue: Digest[] = [root];
  const directories: Directory[] = [];
  let index = 0;
  let pageBytes = 0;
  for (let head = 0; head < queue.length; head++) {
    const digest = queue[head] as Digest;
    const what = head === 0 ? "root_digest" : "a Directory below root_digest";
    checkMessageSize(digest, maxDirectoryBytes, what, INPUT_TREE_LIMIT_KEYS.maxDirectoryBytes);
    const bytes = await cas.get(digest);
    if (!bytes) {
      if (head === 0) throw notFound(`root directory ${formatDigest(root)} is not in the CAS`);
      continue;
    }
    if (index >= offset) {
      if (directories.length >= pageSize || (directories.length > 0 && pageBytes + bytes.byteLength > maxBytes)) {
        return { directories, nextOffset: index };
      }
    }
    const directory = decodeDirectory(bytes, digest);
    checkDirectory(directory, digest);
    if (index >= offset) {
      directories.push(directory);
      pageBytes += bytes.byteLength;
    }
    index++;
    for (const [i, child] of directory.directories.entries()) {
      const childDigest = parseDigest(
        root.fn,
        child.digest,
        `directory ${formatDigest(digest)} directories[${i}].digest`,
      );
      const key = digestKey(childDigest);
      if (!seen.has(key)) {
        seen.add(key);
        queue.push(childDigest);
      }
    }
  }
  return { directories, nextOffset: undefined };
}

function decodeDirectory(bytes: Buffer, digest: Digest): Directory {
  try {
    return Directory.decode(bytes);
  } catch (err) {
    throw invalidArgument(`directory ${formatDigest(digest)}`, `is not a Directory message: ${(err as Error).message}`);
  }
}

/** Names must be single path components, each list sorted, no name used twice. */
export function checkDirectory(directory: Directory, digest: Digest): void {
  const where = `directory ${formatDigest(digest)}`;
  const all = new Set<string>();
  const lists: [string, { name: string }[]][] = [
    ["files", directory.files],
    ["directories", directory.directories],
    ["symlinks", directory.symlinks],
  ];
  for (const [list, nodes] of lists) {
    let previous: string | undefined;
    nodes.forEach((node, i) => {
      const field = `${where} ${list}[${i}].name`;
      checkName(node.name, field);
      if (previous !== undefined && compareNames(previous, node.name) >= 0) {
        throw invalidArgument(
          field,
          `"${node.name}" is not sorted after "${previous}" (entries must be sorted and unique)`,
        );
      }
      if (all.has(node.name)) throw invalidArgument(field, `"${node.name}" appears in more than one list`);
      all.add(node.name);
      previous = node.name;
    });
  }
}

function checkName(name: string, field: string): void {
  if (name === "" || name === "." || name === "..") throw invalidArgument(field, `"${name}" is not a valid name`);
  if (name.includes("/")) throw invalidArgument(field, `"${name}" contains "/"; names are single path components`);
  if (name.includes("\0")) throw invalidArgument(field, "name contains a NUL byte");
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) {
    throw invalidArgument(
      field,
      `"${name.slice(0, 40)}…" is longer than ${MAX_NAME_BYTES} bytes, the file system's limit`,
    );
  }
}

/** NAME_MAX of Linux file systems: longer names fail with ENAMETOOLONG. */
const MAX_NAME_BYTES = 255;

/** Byte order of the UTF-8 encodings, as the protocol sorts names. */
function compareNames(a: string, b: string): number {
  // UTF-16 code units below the surrogates order as UTF-8 bytes do: only names that differ at or past one need
  // the encodings (this runs for every entry of every input tree, so it must not allocate).
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    if (x < 0xd800 && y < 0xd800) return x - y;
    return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
  }
  return a.length - b.length;
}
