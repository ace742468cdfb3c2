import type { ActionCache } from "../ac/action-cache.js";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestOf, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  Action,
  ActionResult,
  Command,
  Directory,
  type OutputDirectory,
  type OutputFile,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { missingDirectories, type StoredTree } from "./directory-trees.js";
import type { Qualifier } from "./qualifiers.js";

/**
 * Bumped whenever the entries below change shape, so that an older Berth's
 * entries are never read as current ones.
 */
const ASSET_FORMAT = "1";

export type AssetKind = "blob" | "directory";

/** What an association names, with what must outlive it. */
export interface AssociatedContent {
  /** The blob (kind blob) or the root Directory's tree (kind directory). */
  readonly blob?: Digest;
  readonly tree?: StoredTree;
  readonly referencedBlobs: readonly Digest[];
  readonly referencedTrees: readonly StoredTree[];
  /** When the content was pushed, or its download started (ms since the epoch). */
  readonly at: number;
  /** After this (ms since the epoch) the association is not answered. */
  readonly expireAt: number | undefined;
}

/** An association found for one of a request's URIs. */
export interface Found {
  readonly uriIndex: number;
  /** The blob, or the root Directory. */
  readonly digest: Digest;
  readonly expireAt: number | undefined;
}

const BLOB_PATH = "blob";
const TREE_PATH = "tree";
const REFERENCED_BLOBS = "references/blobs/";
const REFERENCED_TREES = "references/directories/";

/**
 * Associations of URIs and qualifiers with CAS content, kept as action-cache
 * entries of the instance, each under a synthetic action digest derived from
 * (kind, URI, qualifiers): they are evicted like any result, separated by
 * instance name like any result, and, read through the farm's
 * CompletenessCheckingActionCache, an entry whose blob, Tree or any file of
 * its trees was evicted reads as a miss. The Directory messages of trees are
 * checked here besides. No URL, header or qualifier value is stored in the
 * entry, only digests and times.
 */
export class AssetAssociations {
  constructor(
    private readonly ac: ActionCache,
    private readonly cas: BlobStore,
  ) {}

  /** The first of `uris` (in order) with an association satisfying the request, or undefined. */
  async find(
    instanceName: string,
    kind: AssetKind,
    fn: DigestFunction,
    uris: readonly string[],
    qualifiers: readonly Qualifier[],
    oldestAccepted: number | undefined,
  ): Promise<Found | undefined> {
    const now = Date.now();
    for (const [uriIndex, uri] of uris.entries()) {
      const result = await this.ac.get(instanceName, await associationDigest(fn, kind, uri, qualifiers));
      if (!result) continue;
      const content = readEntry(fn, kind, result);
      if (!content) continue;
      if (content.expireAt !== undefined && content.expireAt <= now) continue;
      if (oldestAccepted !== undefined && content.at < oldestAccepted) continue;
      if (kind === "directory" && !(await this.treesPresent(fn, result))) continue;
      return { uriIndex, digest: content.digest, expireAt: content.expireAt };
    }
    return undefined;
  }

  /** Associates each of `uris` (with `qualifiers`) with `content`. */
  async remember(
    instanceName: string,
    kind: AssetKind,
    fn: DigestFunction,
    uris: readonly string[],
    qualifiers: readonly Qualifier[],
    content: AssociatedContent,
  ): Promise<void> {
    const result = entryOf(kind, content);
    for (const uri of new Set(uris)) {
      await this.ac.put(instanceName, await associationDigest(fn, kind, uri, qualifiers), result);
    }
  }

  private async treesPresent(fn: DigestFunction, result: ActionResult): Promise<boolean> {
    for (const [i, dir] of result.outputDirectories.entries()) {
      const tree = parseDigest(fn, dir.treeDigest, `output_directories[${i}].tree_digest`);
      if ((await missingDirectories(this.cas, fn, tree)).length > 0) return false;
    }
    return true;
  }
}

/**
 * The digest of the action that stands for one association. Its command is
 * none a client could mean to run: its first argument names Berth's asset
 * store and the format salts it. Each qualifier is two arguments, so no
 * name or value can be taken for another.
 */
export async function associationDigest(
  fn: DigestFunction,
  kind: AssetKind,
  uri: string,
  qualifiers: readonly Qualifier[],
): Promise<Digest> {
  const command = Command.encode(
    Command.fromPartial({
      arguments: [
        "berth-internal:asset",
        `format=${ASSET_FORMAT}`,
        kind,
        uri,
        ...qualifiers.flatMap((q) => [q.name, q.value]),
      ],
      outputPaths: [kind === "blob" ? BLOB_PATH : TREE_PATH],
    }),
  ).finish();
  const commandDigest = await digestOf(fn, command);
  const emptyDirectory = await digestOf(fn, Directory.encode(Directory.fromPartial({})).finish());
  const action = Action.encode(
    Action.fromPartial({
      commandDigest: { hash: commandDigest.hash, sizeBytes: commandDigest.sizeBytes },
      inputRootDigest: { hash: emptyDirectory.hash, sizeBytes: emptyDirectory.sizeBytes },
      doNotCache: false,
    }),
  ).finish();
  return digestOf(fn, action);
}

function wire(d: Digest): { hash: string; sizeBytes: number } {
  return { hash: d.hash, sizeBytes: d.sizeBytes };
}

function outputTree(path: string, tree: StoredTree): OutputDirectory {
  return {
    path,
    treeDigest: wire(tree.tree),
    isTopologicallySorted: false,
    rootDirectoryDigest: wire(tree.root),
  };
}

function entryOf(kind: AssetKind, content: AssociatedContent): ActionResult {
  const outputFiles: OutputFile[] = [];
  const outputDirectories: OutputDirectory[] = [];
  if (kind === "blob" && content.blob) {
    outputFiles.push({
      path: BLOB_PATH,
      digest: wire(content.blob),
      isExecutable: false,
      contents: Buffer.alloc(0),
      nodeProperties: undefined,
    });
  }
  if (kind === "directory" && content.tree) outputDirectories.push(outputTree(TREE_PATH, content.tree));
  content.referencedBlobs.forEach((d, i) => {
    outputFiles.push({
      path: `${REFERENCED_BLOBS}${i}`,
      digest: wire(d),
      isExecutable: false,
      contents: Buffer.alloc(0),
      nodeProperties: undefined,
    });
  });
  content.referencedTrees.forEach((t, i) => {
    outputDirectories.push(outputTree(`${REFERENCED_TREES}${i}`, t));
  });
  const at = { seconds: Math.floor(content.at / 1000), nanos: (content.at % 1000) * 1e6 };
  return ActionResult.fromPartial({
    outputFiles,
    outputDirectories,
    // Only the expiry: nothing a client sent (URLs, headers) is kept in the entry.
    stdoutRaw: Buffer.from(JSON.stringify({ expireAt: content.expireAt ?? null })),
    executionMetadata: { worker: "berth-asset", workerStartTimestamp: at, workerCompletedTimestamp: at },
  });
}

function readEntry(
  fn: DigestFunction,
  kind: AssetKind,
  result: ActionResult,
): { digest: Digest; at: number; expireAt: number | undefined } | undefined {
  let digest: Digest | undefined;
  try {
    if (kind === "blob") {
      const file = result.outputFiles.find((f) => f.path === BLOB_PATH);
      if (file) digest = parseDigest(fn, file.digest, "blob");
    } else {
      const dir = result.outputDirectories.find((d) => d.path === TREE_PATH);
      if (dir) digest = parseDigest(fn, dir.rootDirectoryDigest, "root");
    }
  } catch {
    return undefined;
  }
  if (!digest) return undefined;
  const stamp = result.executionMetadata?.workerCompletedTimestamp;
  const at = stamp ? stamp.seconds * 1000 + Math.floor(stamp.nanos / 1e6) : 0;
  let expireAt: number | undefined;
  try {
    const meta = JSON.parse(Buffer.from(result.stdoutRaw).toString("utf8")) as { expireAt?: unknown };
    expireAt = typeof meta.expireAt === "number" ? meta.expireAt : undefined;
  } catch {
    expireAt = undefined;
  }
  return { digest, at, expireAt };
}
