import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import type { BlobStore } from "../cas/blob-store.js";
import { checkMessageSize } from "../cas/message-size.js";
import { INPUT_TREE_LIMIT_KEYS, type InputTreeLimits } from "../cas/tree-limits.js";
import { type Digest, digestKey, digestOf, formatDigest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, invalidArgument, missingBlobs, StatusError } from "../status/status.js";

/** A directory tree whose every blob was found in the CAS, with the Tree message that lists it (stored). */
export interface StoredTree {
  readonly root: Digest;
  readonly tree: Digest;
}

/** The limits a pushed tree is walked within: the input-tree ones of execution.inputLimits. */
export type TreeWalkLimits = Pick<
  InputTreeLimits,
  "maxDirectoryBlobs" | "maxDirectoryBytes" | "maxTotalDirectoryBytes"
>;

/**
 * Reads the tree below `root` and stores a Tree message of it, so that the
 * action cache's completeness check can later see at one read whether any
 * of its blobs was evicted. Every Directory and file must be in the CAS:
 * otherwise FAILED_PRECONDITION with a MISSING violation for each absent one
 * (`field` names the request field for the message).
 */
export async function storeTree(
  cas: BlobStore,
  root: Digest,
  limits: TreeWalkLimits,
  field: string,
): Promise<StoredTree> {
  /** Each Directory's bytes as stored: the Tree holds them unchanged, so their digests can be found again. */
  const directories: Uint8Array[] = [];
  const missing: Digest[] = [];
  const files = new Map<string, Digest>();
  const seen = new Set<string>([digestKey(root)]);
  const queue: Digest[] = [root];
  let totalBytes = 0;
  for (let head = 0; head < queue.length; head++) {
    const digest = queue[head] as Digest;
    if (queue.length > limits.maxDirectoryBlobs) {
      throw tooLarge(field, `more than ${limits.maxDirectoryBlobs} Directory messages`, "maxDirectoryBlobs");
    }
    checkMessageSize(
      digest,
      limits.maxDirectoryBytes,
      `a Directory of ${field}`,
      INPUT_TREE_LIMIT_KEYS.maxDirectoryBytes,
    );
    totalBytes += digest.sizeBytes;
    if (totalBytes > limits.maxTotalDirectoryBytes) {
      throw tooLarge(
        field,
        `more than ${limits.maxTotalDirectoryBytes} bytes of Directory messages`,
        "maxTotalDirectoryBytes",
      );
    }
    const bytes = await cas.get(digest);
    if (!bytes) {
      missing.push(digest);
      continue;
    }
    let directory: Directory;
    try {
      directory = Directory.decode(bytes);
    } catch (err) {
      throw invalidArgument(field, `${formatDigest(digest)} is not a Directory message: ${(err as Error).message}`);
    }
    directories.push(bytes);
    directory.files.forEach((file, i) => {
      const d = parseDigest(root.fn, file.digest, `${field}: directory ${formatDigest(digest)} files[${i}].digest`);
      files.set(digestKey(d), d);
    });
    directory.directories.forEach((child, i) => {
      const d = parseDigest(
        root.fn,
        child.digest,
        `${field}: directory ${formatDigest(digest)} directories[${i}].digest`,
      );
      if (!seen.has(digestKey(d))) {
        seen.add(digestKey(d));
        queue.push(d);
      }
    });
  }
  missing.push(...(await cas.findMissing([...files.values()])));
  if (missing.length > 0) throw missingBlobs(missing.map((d) => `blobs/${formatDigest(d)}`));
  const bytes = encodeTree(directories);
  const tree = await digestOf(root.fn, bytes);
  await cas.put(tree, bytes, { hashedByCaller: true });
  return { root, tree };
}

/**
 * The Directory messages a stored Tree lists that the CAS no longer has
 * (the action cache's own check covers the Tree blob and the files, not
 * these, which a client reading the tree from its root needs too).
 */
export async function missingDirectories(cas: BlobStore, fn: DigestFunction, tree: Digest): Promise<Digest[]> {
  const bytes = await cas.get(tree);
  if (!bytes) return [tree];
  const digests = new Map<string, Digest>();
  for (const directory of treeDirectories(bytes)) {
    const digest = await digestOf(fn, directory);
    digests.set(digestKey(digest), digest);
  }
  return cas.findMissing([...digests.values()]);
}

/** A Tree message (root = 1, children = 2) written from the Directory messages' own bytes, the root first. */
function encodeTree(directories: readonly Uint8Array[]): Uint8Array {
  const writer = new BinaryWriter();
  directories.forEach((bytes, i) => {
    writer.tag(i === 0 ? 1 : 2, WireType.LengthDelimited).bytes(bytes);
  });
  return writer.finish();
}

/** The bytes of every Directory a Tree message holds, as they were written. */
function treeDirectories(bytes: Uint8Array): Uint8Array[] {
  const reader = new BinaryReader(bytes);
  const out: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if ((field === 1 || field === 2) && wireType === WireType.LengthDelimited) out.push(reader.bytes());
    else reader.skip(wireType);
  }
  return out;
}

function tooLarge(field: string, what: string, limit: keyof typeof INPUT_TREE_LIMIT_KEYS): StatusError {
  const key = INPUT_TREE_LIMIT_KEYS[limit];
  const message = `${field} names a tree of ${what}, over this farm's limit (${key})`;
  return new StatusError(Code.FAILED_PRECONDITION, message, {
    preconditionFailures: [{ type: "MESSAGE_SIZE_LIMIT", subject: key, description: message }],
  });
}
