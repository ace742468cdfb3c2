import { chmodSync, chownSync, copyFileSync, linkSync, mkdirSync, statSync, symlinkSync } from "node:fs";
import { chmod, chown, copyFile, link, mkdir, stat, symlink } from "node:fs/promises";
import { join } from "node:path";
import { checkDirectory } from "../cas/directory-tree.js";
import { blobBatches, checkMessageSize, MAX_DIRECTORY_BYTES_IN_FLIGHT } from "../cas/message-size.js";
import {
  checkTreeLimits,
  DEFAULT_INPUT_TREE_LIMITS,
  INPUT_TREE_LIMIT_KEYS,
  type InputTreeLimits,
  inputLimitExceeded,
} from "../cas/tree-limits.js";
import { type Digest, digestKey, digestOf, formatDigest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { hostMode } from "../image/host-mode.js";
import { imageModeOf } from "../image/open-directories.js";
import { invalidArgument, missingBlobs } from "../status/status.js";
import type { ActionInputs } from "./action-inputs.js";
import type { DirectoryCache } from "./directory-cache.js";
import { type BlobsAtHand, describeMissing, type FileCache } from "./file-cache.js";
import type { RemoteCas } from "./remote-cas.js";

/** Who owns the directories of an action's tree, so its unprivileged user can write there. */
export interface TreeOwner {
  uid: number;
  gid: number;
}

/** Mode of a directory whose Directory message names none. */
const DEFAULT_DIRECTORY_MODE = 0o755;
/**
 * Trees with at most this many entries are made with synchronous calls. Each
 * asynchronous call is a round trip through libuv's thread pool, and on a
 * busy machine every round trip waits to be scheduled, twice; a typical
 * action's tree is a chain of a few directories and files made one level
 * after another, so those waits, not the microseconds of the system calls,
 * were most of the time it took to lay it out.
 */
const SYNC_LAYOUT_LIMIT = 64;

/** Where a tree's Directory messages come from, and the bounds it must keep. */
export type TreeSource = Pick<ActionInputs, "cas" | "directories" | "limits">;

/** What laying out a Directory tree below some target creates, read from its Directory messages. */
export interface TreePlan {
  /** Parents before their children, the target itself first. */
  directories: { path: string; unixMode: number | undefined; imageMode?: number }[];
  files: { path: string; digest: Digest; executable: boolean }[];
  symlinks: { path: string; target: string }[];
  /** The sizes of the files summed (a file listed twice counts twice). */
  fileBytes: number;
}

export interface LayOutOptions {
  /** Gives every directory to this user; without it they stay the worker's. */
  owner?: TreeOwner;
  /** Contents of some files (they came with the assignment): written, not fetched. */
  files?: BlobsAtHand;
  /**
   * Gives each directory its Directory's node_properties.unix_mode (0755 when
   * it has none), as an image's tree needs; without it every directory is 0755.
   * Files keep the file cache's modes (0444, 0555 when executable): they are
   * hard links to its copies, and a hard link shares its mode.
   */
  directoryModes?: boolean;
}

/**
 * Lays out the input root `root` in `target`: directories are created (and
 * given to the action's user), files hard-linked from the file cache,
 * symlinks created as they are. Every missing blob is reported at once, as
 * FAILED_PRECONDITION with one MISSING violation each.
 */
export async function materializeInputRoot(
  fn: DigestFunction,
  root: Digest,
  target: string,
  inputs: ActionInputs,
  /** Contents of some files (they came with the assignment): written, not fetched. */
  files?: BlobsAtHand,
): Promise<void> {
  const plan = await planTree(fn, root, target, inputs);
  await layOutTree(plan, inputs.cas, inputs.files, { owner: inputs.owner, files });
}

/**
 * Reads the tree `root` (see fetchDirectories; `wholeTree` asks for one
 * GetTree even when the root's own Directory is already known) into what
 * laying it out below `target` creates. The server checked the tree against
 * its limits before queueing the action; the worker checks again (a tree
 * that slipped through, a farm with other limits) before it expands
 * anything, so no tree can make it run out of memory or stack.
 */
export async function planTree(
  fn: DigestFunction,
  root: Digest,
  target: string,
  source: TreeSource,
  wholeTree = false,
): Promise<TreePlan> {
  const { limits } = source;
  const directories = await fetchDirectories(fn, root, source, wholeTree);
  checkTreeLimits(fn, root, (key) => directories.get(key), limits);
  const plan: TreePlan = { directories: [], files: [], symlinks: [], fileBytes: 0 };
  // Depth first with an explicit stack (children pushed in reverse keep the Directory's order): parents come
  // before their children, and no depth of tree can overflow the call stack.
  const pending: { digest: Digest; path: string }[] = [{ digest: root, path: target }];
  for (let next = pending.pop(); next !== undefined; next = pending.pop()) {
    const { digest, path } = next;
    const directory = directories.get(digestKey(digest)) as Directory;
    const imageMode = imageModeOf(directory.nodeProperties?.properties);
    plan.directories.push({
      path,
      unixMode: directory.nodeProperties?.unixMode,
      ...(imageMode === undefined ? {} : { imageMode }),
    });
    for (const file of directory.files) {
      const fileDigest = parseDigest(fn, file.digest, `${path}/${file.name}`);
      plan.files.push({ path: join(path, file.name), digest: fileDigest, executable: file.isExecutable });
      plan.fileBytes += fileDigest.sizeBytes;
    }
    for (const link of directory.symlinks) plan.symlinks.push({ path: join(path, link.name), target: link.target });
    for (let i = directory.directories.length - 1; i >= 0; i--) {
      const child = directory.directories[i] as Directory["directories"][number];
      const childPath = join(path, child.name);
      pending.push({ digest: parseDigest(fn, child.digest, childPath), path: childPath });
    }
  }
  return plan;
}

/**
 * Creates what `plan` lists, the files linked from `cache` (fetched first
 * when absent, pinned while they are linked). Missing blobs are
 * FAILED_PRECONDITION with one MISSING violation each, all reported at once.
 */
export async function layOutTree(
  plan: TreePlan,
  cas: RemoteCas,
  cache: FileCache,
  options: LayOutOptions = {},
): Promise<void> {
  const { missing, release } = await cache.ensure(cas, plan.files, options.files);
  try {
    if (missing.length > 0) throw missingBlobs(describeMissing(missing));
    const entries = plan.directories.length + plan.files.length + plan.symlinks.length;
    if (entries <= SYNC_LAYOUT_LIMIT) layOutSync(plan, cache, options);
    else await layOut(plan, cache, options);
  } finally {
    release();
  }
}

/** Makes the directories (each depth at once), links the cached files and makes the symlinks. */
async function layOut(plan: TreePlan, cache: FileCache, options: LayOutOptions): Promise<void> {
  // Parents come before their children in the plan, so each depth can be made at once.
  const byDepth = new Map<number, TreePlan["directories"]>();
  for (const dir of plan.directories) {
    const depth = dir.path.split("/").length;
    const same = byDepth.get(depth);
    if (same) same.push(dir);
    else byDepth.set(depth, [dir]);
  }
  const depths = [...byDepth.keys()].sort((a, b) => a - b);
  for (const depth of depths) {
    await Promise.all(
      (byDepth.get(depth) as TreePlan["directories"]).map(async (dir) => {
        await mkdir(dir.path, { recursive: true, mode: DEFAULT_DIRECTORY_MODE });
        if (options.owner) await chown(dir.path, options.owner.uid, options.owner.gid);
      }),
    );
  }
  await Promise.all(plan.files.map((f) => linkOrCopy(cache.pathOf(f.digest, f.executable), f.path)));
  await Promise.all(plan.symlinks.map((s) => symlink(s.target, s.path)));
  if (options.directoryModes) {
    // Last, and deepest first: a mode without write or search permission must not stop the making of what
    // is below it. chmod, unlike mkdir, is not narrowed by the umask.
    for (const depth of depths.reverse()) {
      await Promise.all(
        (byDepth.get(depth) as TreePlan["directories"]).map((dir) =>
          chmod(dir.path, hostMode(dir.unixMode ?? DEFAULT_DIRECTORY_MODE)),
        ),
      );
    }
  }
}

/** layOut's steps as synchronous calls, for small trees (see SYNC_LAYOUT_LIMIT). */
function layOutSync(plan: TreePlan, cache: FileCache, options: LayOutOptions): void {
  for (const dir of plan.directories) {
    mkdirSync(dir.path, { recursive: true, mode: DEFAULT_DIRECTORY_MODE });
    if (options.owner) chownSync(dir.path, options.owner.uid, options.owner.gid);
  }
  for (const file of plan.files) linkOrCopySync(cache.pathOf(file.digest, file.executable), file.path);
  for (const link of plan.symlinks) symlinkSync(link.target, link.path);
  if (options.directoryModes) {
    // Parents come before their children in the plan, so in reverse every directory comes before its parent.
    for (const dir of [...plan.directories].reverse()) {
      chmodSync(dir.path, hostMode(dir.unixMode ?? DEFAULT_DIRECTORY_MODE));
    }
  }
}

/**
 * A hard link to the cached copy, or a copy of it (same mode) once the copy
 * has as many links as its file system allows (EMLINK: 65,000 on ext4): an
 * input root may name one content any number of times.
 */
async function linkOrCopy(cached: string, path: string): Promise<void> {
  try {
    await link(cached, path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EMLINK") throw err;
    await copyFile(cached, path);
    await chmod(path, (await stat(cached)).mode & 0o777);
  }
}

function linkOrCopySync(cached: string, path: string): void {
  try {
    linkSync(cached, path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EMLINK") throw err;
    copyFileSync(cached, path);
    chmodSync(path, statSync(cached).mode & 0o777);
  }
}

/**
 * One Directory message, from `known` or else read from the CAS (and then
 * remembered there); an absent one is FAILED_PRECONDITION with a MISSING
 * violation.
 */
export async function readDirectory(
  digest: Digest,
  cas: RemoteCas,
  known: DirectoryCache,
  limits: InputTreeLimits = DEFAULT_INPUT_TREE_LIMITS,
): Promise<Directory> {
  const cached = known.get(digestKey(digest));
  if (cached) return cached;
  const read = await readDirectories([digest], cas, known, limits, new Map());
  return read.get(digestKey(digest)) as Directory;
}

/**
 * Every Directory of the tree by key. A root the worker has not seen (or
 * any root, with `wholeTree`) comes in one GetTree call instead of one
 * round trip per level; directories seen before come from `known`.
 * Whatever GetTree could not supply (a client whose encoding differs from
 * the server's re-encoding hashes differently) is read level by level in
 * batches.
 */
async function fetchDirectories(
  fn: DigestFunction,
  root: Digest,
  source: TreeSource,
  wholeTree: boolean,
): Promise<Map<string, Directory>> {
  const { cas, directories: known, limits } = source;
  if (wholeTree || !known.get(digestKey(root))) {
    for (const directory of await cas.getTree(root)) {
      const bytes = Directory.encode(directory).finish();
      // Left to be read on its own below, where its size is refused with the limit's name.
      if (bytes.byteLength > limits.maxDirectoryBytes) continue;
      known.set(digestKey(await digestOf(fn, bytes)), directory, bytes.byteLength);
    }
  }
  const found = new Map<string, Directory>();
  // The first path each directory was found at, to name it in refusals.
  const paths = new Map<string, string>([[digestKey(root), ""]]);
  // Bytes of the distinct Directory messages, from their digests, counted before they are read.
  let directoryBytes = root.sizeBytes;
  let level: Digest[] = [root];
  for (let depth = 0; level.length > 0; depth++) {
    if (depth > limits.maxDepth) {
      throw inputLimitExceeded("maxDepth", limits, `is more than ${limits.maxDepth} directories deep`);
    }
    const absent: Digest[] = [];
    for (const digest of level) {
      const directory = known.get(digestKey(digest));
      if (directory) found.set(digestKey(digest), directory);
      else absent.push(digest);
    }
    for (const [key, directory] of await readDirectories(absent, cas, known, limits, paths)) {
      found.set(key, directory);
    }
    const next = new Map<string, Digest>();
    for (const digest of level) {
      const directory = found.get(digestKey(digest)) as Directory;
      for (const child of directory.directories) {
        const childDigest = parseDigest(fn, child.digest, `directory ${child.name}`);
        const key = digestKey(childDigest);
        if (found.has(key) || next.has(key)) continue;
        next.set(key, childDigest);
        const parent = paths.get(digestKey(digest)) ?? "";
        if (!paths.has(key)) paths.set(key, parent === "" ? child.name : `${parent}/${child.name}`);
      }
    }
    for (const digest of next.values()) directoryBytes += digest.sizeBytes;
    if (directoryBytes > limits.maxTotalDirectoryBytes) {
      throw inputLimitExceeded(
        "maxTotalDirectoryBytes",
        limits,
        `has more than ${limits.maxTotalDirectoryBytes} bytes of Directory messages`,
      );
    }
    if (found.size + next.size > limits.maxDirectoryBlobs) {
      throw inputLimitExceeded(
        "maxDirectoryBlobs",
        limits,
        `has more than ${limits.maxDirectoryBlobs} distinct Directory messages`,
      );
    }
    level = [...next.values()];
  }
  return found;
}

/**
 * Reads, checks and remembers Directory messages, at most
 * MAX_DIRECTORY_BYTES_IN_FLIGHT bytes at once; any absent one is MISSING,
 * and one over maxDirectoryBytes is refused before anything is read.
 */
async function readDirectories(
  digests: readonly Digest[],
  cas: RemoteCas,
  known: DirectoryCache,
  limits: InputTreeLimits,
  paths: ReadonlyMap<string, string>,
): Promise<Map<string, Directory>> {
  const read = new Map<string, Directory>();
  if (digests.length === 0) return read;
  for (const digest of digests) {
    const path = paths.get(digestKey(digest)) ?? "";
    const what =
      path === "" ? "the input root" : `input directory "${path.length > 200 ? `…${path.slice(-200)}` : path}"`;
    checkMessageSize(digest, limits.maxDirectoryBytes, what, INPUT_TREE_LIMIT_KEYS.maxDirectoryBytes);
  }
  const blobs = new Map<Digest, Buffer>();
  for (const batch of blobBatches(digests, Number.POSITIVE_INFINITY, MAX_DIRECTORY_BYTES_IN_FLIGHT)) {
    for (const [digest, bytes] of await cas.readBlobs(batch)) blobs.set(digest, bytes);
  }
  const missing = digests.filter((d) => !blobs.has(d));
  if (missing.length > 0) throw missingBlobs(describeMissing(missing));
  for (const [digest, bytes] of blobs) {
    let directory: Directory;
    try {
      directory = Directory.decode(bytes);
    } catch (err) {
      throw invalidArgument(
        `directory ${formatDigest(digest)}`,
        `is not a Directory message: ${(err as Error).message}`,
      );
    }
    checkDirectory(directory, digest);
    known.set(digestKey(digest), directory, bytes.byteLength);
    read.set(digestKey(digest), directory);
  }
  return read;
}
