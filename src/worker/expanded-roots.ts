import { randomUUID } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { type Created, PinnedLru } from "../cache/pinned-lru.js";
import { stampUse } from "../cache/use-stamp.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { type Digest, formatDigest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { type UpperDirectory, upperDirectories } from "../image/open-directories.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";
import type { DirectoryCache } from "./directory-cache.js";
import type { FileCache } from "./file-cache.js";
import { layOutTree, planTree, readDirectory } from "./input-root.js";
import type { RemoteCas } from "./remote-cas.js";

export interface ExpandedRootsOptions {
  /** Past this many bytes of files, the least recently used roots no action holds are deleted. */
  maxBytes: number;
  /** Failures of evictions done in the background (after a release). */
  onError?: (err: unknown) => void;
}

/** A materialized root, held until `release` (idempotent; it never rejects, see `onError`). */
export interface AcquiredRoot {
  /** The tree's root directory. */
  dir: string;
  /** To make in an action's upper layer: the image's own modes of directories tamed on the host. */
  upperDirectories: UpperDirectory[];
  release(): Promise<void>;
}

/** What `root.json` beside each tree records. */
interface RootRecord {
  /** ROOT_FORMAT when written; trees of other versions are laid out again. */
  format?: number;
  root: string;
  size: number;
  /** Directories (relative paths) whose Directory carried the image's own mode (berth.image-mode). */
  opened?: [string, number][];
}

/** 2: directory modes tamed (hostMode), opened directories recorded. Older trees may keep 0777 directories. */
const ROOT_FORMAT = 2;

/** What the index keeps of a root on disk (its size is the index's). */
interface StoredRoot {
  opened: Map<string, number>;
  /** When `root.json`'s mtime was last moved forward (see stampUse). */
  usedAt: number;
}

/**
 * Base roots of expanded images (image trees in the CAS), materialized once
 * per worker and shared by every action in the image as the read-only lower
 * layer of its overlay. Each lives in `dir/roots/{key}/tree`, with
 * `root.json` beside it whose mtime records the last use; it is laid out
 * under `dir/tmp/` and renamed into place whole, so `roots/` only ever holds
 * complete trees, which a restarted worker finds again. Files are hard links
 * to the file cache's read-only copies, directories belong to the worker's
 * user (root, when it mounts overlays): actions, which only ever see a tree
 * through an overlay as another user, cannot change it.
 *
 * A root is pinned from `acquire` to `release` and never evicted then; past
 * `maxBytes` the others go, least recently used first.
 */
export class ExpandedRoots {
  /** Roots on disk by key. */
  private readonly roots: PinnedLru<string, StoredRoot>;
  private materializedCount = 0;

  private constructor(
    private readonly dir: string,
    private readonly maxBytes: number,
    options: ExpandedRootsOptions,
  ) {
    this.roots = new PinnedLru({
      maxBytes: options.maxBytes,
      dispose: (key) => this.deleteTree(key),
      onError: options.onError,
    });
  }

  /** Opens the store in `dir`: half-written trees of an earlier run are deleted, complete ones kept. */
  static async open(dir: string, options: ExpandedRootsOptions): Promise<ExpandedRoots> {
    const store = new ExpandedRoots(dir, options.maxBytes, options);
    await rm(store.tempDir, { recursive: true, force: true });
    await mkdir(store.tempDir, { recursive: true });
    await mkdir(store.rootsDir, { recursive: true });
    // Only root (the worker) goes in: a tree's directories have the image's modes, a 1777 /tmp among them,
    // which must not let any user of the host write into the shared copy.
    await chmod(dir, 0o700);
    await store.scan();
    return store;
  }

  /** Bytes of the files of the roots on disk. */
  get usedBytes(): number {
    return this.roots.bytes;
  }

  /** How many trees this store has laid out since it was opened (not those found on disk). */
  get materializations(): number {
    return this.materializedCount;
  }

  /** Whether the tree `root` is materialized. */
  has(root: Digest): boolean {
    return this.roots.has(rootKey(root));
  }

  /**
   * The tree `root` materialized under the store's directory (laid out
   * first if absent, once however many callers ask at the same time),
   * pinned until `release`. Missing blobs are FAILED_PRECONDITION with one
   * MISSING violation each; a tree whose files alone pass `maxBytes` is
   * RESOURCE_EXHAUSTED.
   */
  async acquire(
    fn: DigestFunction,
    root: Digest,
    cas: RemoteCas,
    files: FileCache,
    directories: DirectoryCache,
  ): Promise<AcquiredRoot> {
    const key = rootKey(root);
    const lease = await this.roots.acquire(key, () => this.materialize(fn, root, key, cas, files, directories));
    try {
      stampUse(lease.value, join(this.dirOf(key), "root.json"));
      const upper = await upperDirectories([{ dir: this.treeOf(key), opened: lease.value.opened, opaque: new Set() }]);
      return { dir: this.treeOf(key), upperDirectories: upper, release: lease.release };
    } catch (err) {
      await lease.release();
      throw err;
    }
  }

  private async materialize(
    fn: DigestFunction,
    root: Digest,
    key: string,
    cas: RemoteCas,
    files: FileCache,
    directories: DirectoryCache,
  ): Promise<Created<StoredRoot>> {
    const work = join(this.tempDir, randomUUID());
    try {
      await mkdir(work);
      // One GetTree for the whole tree even when its top is known (the graft check reads it): an image has
      // many levels, each a round trip otherwise.
      const source = { cas, directories, limits: DEFAULT_INPUT_TREE_LIMITS };
      const plan = await planTree(fn, root, join(work, "tree"), source, true);
      if (plan.fileBytes > this.maxBytes) {
        throw new StatusError(
          Code.RESOURCE_EXHAUSTED,
          `image root ${formatDigest(root)} holds ${plan.fileBytes} bytes of files, more than the worker's cap of ${this.maxBytes} (worker.expandedRootsMaxSizeBytes)`,
        );
      }
      await layOutTree(plan, cas, files, { directoryModes: true });
      const tree = join(work, "tree");
      const opened = new Map<string, number>();
      for (const dir of plan.directories) {
        const rel = relative(tree, dir.path);
        if (dir.imageMode !== undefined && rel !== "") opened.set(rel, dir.imageMode);
      }
      const record: RootRecord = {
        format: ROOT_FORMAT,
        root: `${fn.name}/${formatDigest(root)}`,
        size: plan.fileBytes,
        opened: [...opened],
      };
      await writeFile(join(work, "root.json"), JSON.stringify(record));
      await rename(work, this.dirOf(key));
      this.materializedCount++;
      return { value: { opened, usedAt: Date.now() }, size: plan.fileBytes };
    } finally {
      // Gone already when the rename succeeded.
      await rm(work, { recursive: true, force: true });
    }
  }

  /** Indexes the trees an earlier run completed, least recently used first; anything else there goes. */
  private async scan(): Promise<void> {
    const found: { key: string; size: number; value: StoredRoot; usedAt: number }[] = [];
    for (const key of await readdir(this.rootsDir)) {
      const recordPath = join(this.dirOf(key), "root.json");
      try {
        const record = JSON.parse(await readFile(recordPath, "utf8")) as Partial<RootRecord>;
        if (typeof record.size !== "number" || record.size < 0) throw new Error("no size");
        if (record.format !== ROOT_FORMAT) throw new Error("laid out by an older version, untamed");
        const usedAt = (await stat(recordPath)).mtimeMs;
        found.push({ key, size: record.size, value: { opened: new Map(record.opened ?? []), usedAt }, usedAt });
      } catch {
        await rm(this.dirOf(key), { recursive: true, force: true });
      }
    }
    await this.roots.restore(found);
  }

  /** Renamed away first, so the root vanishes at once; a crash mid-delete leaves it in tmp/. */
  private async deleteTree(key: string): Promise<void> {
    const doomed = join(this.tempDir, randomUUID());
    await rename(this.dirOf(key), doomed);
    await rm(doomed, { recursive: true, force: true });
  }

  private get rootsDir(): string {
    return join(this.dir, "roots");
  }

  private get tempDir(): string {
    return join(this.dir, "tmp");
  }

  private dirOf(key: string): string {
    return join(this.rootsDir, key);
  }

  private treeOf(key: string): string {
    return join(this.dirOf(key), "tree");
  }
}

/** A root's directory name: one path component, without the characters overlay options reserve. */
function rootKey(root: Digest): string {
  return `${root.fn.name}-${root.hash}-${root.sizeBytes}`;
}

/**
 * The client's input root inside an expanded action's input root `merged`:
 * the directory at `inputRootPath`. The worker runs the action on
 * `baseRoot` (shared, materialized once) with only that directory laid out
 * anew, so `merged` must be exactly `baseRoot` with it grafted there —
 * checked along the path (a few Directory messages), since the action's
 * digest, and with it the cached result, names `merged`. The base must hold
 * an empty directory at the path. Mismatches are INVALID_ARGUMENT.
 */
export async function graftedInputRoot(
  fn: DigestFunction,
  merged: Digest,
  baseRoot: Digest,
  inputRootPath: string,
  cas: RemoteCas,
  directories: DirectoryCache,
): Promise<Digest> {
  const names = inputRootPath.split("/").filter((name) => name !== "");
  let mergedDigest = merged;
  let baseDigest = baseRoot;
  for (const [depth, name] of names.entries()) {
    const above = `/${names.slice(0, depth).join("/")}`;
    const path = `/${names.slice(0, depth + 1).join("/")}`;
    const [mergedDir, baseDir] = await Promise.all([
      readDirectory(mergedDigest, cas, directories),
      readDirectory(baseDigest, cas, directories),
    ]);
    const mergedChild = mergedDir.directories.find((d) => d.name === name);
    if (!mergedChild) {
      throw invalidArgument("action.input_root_digest", `has no directory at ${path} (expanded_image.input_root_path)`);
    }
    const baseChild = baseDir.directories.find((d) => d.name === name);
    if (!baseChild) {
      throw invalidArgument("expanded_image.base_root_digest", `has no directory at ${path} for the input root`);
    }
    const grafted = {
      ...mergedDir,
      directories: mergedDir.directories.map((d) => (d === mergedChild ? baseChild : d)),
    };
    if (!Buffer.from(Directory.encode(grafted).finish()).equals(Directory.encode(baseDir).finish())) {
      throw invalidArgument(
        "action.input_root_digest",
        `is not expanded_image.base_root_digest with the input root at ${inputRootPath}: ${above} differs`,
      );
    }
    mergedDigest = parseDigest(fn, mergedChild.digest, `action.input_root_digest ${path}`);
    baseDigest = parseDigest(fn, baseChild.digest, `expanded_image.base_root_digest ${path}`);
  }
  const placeholder = await readDirectory(baseDigest, cas, directories);
  if (placeholder.files.length + placeholder.directories.length + placeholder.symlinks.length > 0) {
    throw invalidArgument(
      "expanded_image.base_root_digest",
      `holds entries at ${inputRootPath}, where the input root goes; it must be an empty directory`,
    );
  }
  return mergedDigest;
}
