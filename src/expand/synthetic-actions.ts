import type { ActionCache } from "../ac/action-cache.js";
import type { BlobStore } from "../cas/blob-store.js";
import { readTreePage } from "../cas/directory-tree.js";
import { type Digest, digestKey, digestOf, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  Action,
  ActionResult,
  Command,
  Directory,
  Tree,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { LayerCount } from "../image/image-limits.js";

/**
 * Bumped whenever the trees expansion produces change shape (node
 * properties, whiteout handling…), so that entries made by an older Berth
 * are never taken for current ones. 2: modes tamed (no setuid, setgid,
 * group or other write) and the step's counts in stdout_raw.
 */
export const EXPANSION_FORMAT = "2";

/** What an expansion step remembers: the tree it produced for one input (a layer blob or an image manifest). */
export type ExpansionStep = "layer" | "image";

const OUTPUT_PATH = "tree";

/**
 * The digest of the action that stands for one expansion step in the action
 * cache. Its command is not one a client could mean to run: its first
 * argument names Berth's expansion, and the format version salts it.
 */
export async function syntheticActionDigest(fn: DigestFunction, step: ExpansionStep, input: string): Promise<Digest> {
  const command = Command.encode(
    Command.fromPartial({
      arguments: ["berth-internal:expand", `format=${EXPANSION_FORMAT}`, step, input],
      outputPaths: [OUTPUT_PATH],
    }),
  ).finish();
  const emptyDirectory = await digestOf(fn, Directory.encode(Directory.fromPartial({})).finish());
  const commandDigest = await digestOf(fn, command);
  const action = Action.encode(
    Action.fromPartial({
      commandDigest: { hash: commandDigest.hash, sizeBytes: commandDigest.sizeBytes },
      inputRootDigest: { hash: emptyDirectory.hash, sizeBytes: emptyDirectory.sizeBytes },
    }),
  ).finish();
  return digestOf(fn, action);
}

/** The root Directory a synthetic entry names, or undefined when it names none (not one of ours). */
export function rootOfResult(fn: DigestFunction, result: ActionResult): Digest | undefined {
  const output = result.outputDirectories.find((d) => d.path === OUTPUT_PATH);
  if (!output?.rootDirectoryDigest) return undefined;
  return parseDigest(fn, output.rootDirectoryDigest, "output_directories[0].root_directory_digest");
}

/**
 * Records that `step` of `input` produced the tree `root`. The entry is a
 * complete REAPI result: its output directory has a Tree blob as well, so
 * GetActionResult on it, or a completeness check, sees a well-formed entry.
 */
export async function rememberTree(
  ac: ActionCache,
  cas: BlobStore,
  instanceName: string,
  step: ExpansionStep,
  input: string,
  root: Digest,
  count: LayerCount,
): Promise<void> {
  const fn = root.fn;
  // One page with no limits: every Directory once, breadth first, the root first.
  const [rootDirectory, ...children] = (await readTreePage(cas, root, 0, Infinity, Infinity)).directories;
  const treeBytes = Tree.encode({ root: rootDirectory, children }).finish();
  const treeDigest = await digestOf(fn, treeBytes);
  await cas.put(treeDigest, treeBytes);
  const now = Date.now();
  const timestamp = { seconds: Math.floor(now / 1000), nanos: (now % 1000) * 1e6 };
  await ac.put(
    instanceName,
    await syntheticActionDigest(fn, step, input),
    ActionResult.fromPartial({
      outputDirectories: [
        {
          path: OUTPUT_PATH,
          treeDigest: { hash: treeDigest.hash, sizeBytes: treeDigest.sizeBytes },
          isTopologicallySorted: false,
          rootDirectoryDigest: { hash: root.hash, sizeBytes: root.sizeBytes },
        },
      ],
      // The counts the image caps were checked against, for a later image that finds this step done.
      stdoutRaw: Buffer.from(JSON.stringify({ bytes: count.bytes, entries: count.entries })),
      executionMetadata: {
        worker: "berth-expand",
        workerStartTimestamp: timestamp,
        workerCompletedTimestamp: timestamp,
      },
    }),
  );
}

/** The counts rememberTree recorded, or undefined for an entry that has none. */
export function countOfResult(result: ActionResult): LayerCount | undefined {
  try {
    const count = JSON.parse(Buffer.from(result.stdoutRaw).toString("utf8")) as Partial<LayerCount>;
    if (typeof count.bytes !== "number" || typeof count.entries !== "number") return undefined;
    return { bytes: count.bytes, entries: count.entries };
  } catch {
    return undefined;
  }
}

/**
 * The blobs of the tree a synthetic entry names (its Tree blob, every
 * Directory and every file) that the CAS lacks. Read from the Tree blob, so
 * one read replaces a walk of the whole tree.
 */
export async function missingOfResult(fn: DigestFunction, result: ActionResult, cas: BlobStore): Promise<Digest[]> {
  const output = result.outputDirectories.find((d) => d.path === OUTPUT_PATH);
  if (!output?.treeDigest) return [];
  const treeDigest = parseDigest(fn, output.treeDigest, "tree_digest");
  const bytes = await cas.get(treeDigest);
  if (!bytes) return [treeDigest];
  const tree = Tree.decode(bytes);
  const wanted = new Map<string, Digest>();
  for (const directory of tree.root ? [tree.root, ...tree.children] : tree.children) {
    const digest = await digestOf(fn, Directory.encode(directory).finish());
    wanted.set(digestKey(digest), digest);
    for (const file of directory.files) {
      const fileDigest = parseDigest(fn, file.digest, `file ${file.name}`);
      wanted.set(digestKey(fileDigest), fileDigest);
    }
  }
  return cas.findMissing([...wanted.values()]);
}
