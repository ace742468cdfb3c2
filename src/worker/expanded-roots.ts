import { randomUUID } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
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

/** How long a use may go unrecorded on disk; the in-memory order is always exact. */
const MTIME_RESOLUTION_MS = 60_000;

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
  /** Roots on disk by key, least recently used first. */
  private readonly roots = new Map<string, { size: number; touchedAt: number; opened: Map<string, number> }>();
  private readonly pins = new Map<string, number>();
  private readonly materializing = new Map<string, Promise<void>>();
  private readonly removing = new Map<string, Promise<void>>();
  private totalBytes = 0;
  private materializedCount = 0;

  private constructor(
    private readonly dir: string,
    private readonly options: ExpandedRootsOptions,
  ) {}

  /** Opens the store in `dir`: half-written trees of an earlier run are deleted, complete ones kept. */
  static async open(dir: string, options: ExpandedRootsOptions): Promise<ExpandedRoots> {
    const store = new ExpandedRoots(dir, options);
    await rm(store.tempDir, { recursive: true, force: true });
    await mkdir(store.tempDir, { recursive: true });
    await mkdir(store.rootsDir, { recursive: true });
    // Only root (the worker) goes in: a tree's directories have the image's modes, a 1777 /tmp among them,
    // which must not let any user of the host write into the shared copy.
    await chmod(dir, 0o700);
    await store.scan();
    await store.evict();
    return store;
  }

  /** Bytes of the files of the roots on disk. */
  get usedBytes(): number {
    return this.totalBytes;
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
    // Pinned before anything is awaited, so that evictions meanwhile spare it.
    this.pins.set(key, (this.pins.get(key) ?? 0) + 1);
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      const count = (this.pins.get(key) ?? 1) - 1;
      if (count === 0) this.pins.delete(key);
      else this.pins.set(key, count);
      this.touch(key);
      await this.evict().catch((err: unknown) => this.options.onError?.(err));
    };
    try {
      if (!this.touch(key)) {
        let pending = this.materializing.get(key);
        if (!pending) {
          pending = this.materialize(fn, root, key, cas, files, directories).finally(() =>
            this.materializing.delete(key),
          );
          this.materializing.set(key, pending);
        }
        await pending;
      }
      const opened = this.roots.get(key)?.opened ?? new Map<string, number>();
      const upper = await upperDirectories([{ dir: this.treeOf(key), opened, opaque: new Set() }]);
      return { dir: this.treeOf(key), upperDirectories: upper, release };
    } catch (err) {
      await release();
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
  ): Promise<void> {
    // An eviction of the same root may still be moving the old copy out of the way.
    await this.removing.get(key)?.catch(() => {});
    const work = join(this.tempDir, randomUUID());
    try {
      await mkdir(work);
      // One GetTree for the whole tree even when its top is known (the graft check reads it): an image has
      // many levels, each a round trip otherwise.
      const source = { cas, directories, limits: DEFAULT_INPUT_TREE_LIMITS };
      const plan = await planTree(fn, root, join(work, "tree"), source, true);
      if (plan.fileBytes > this.options.maxBytes) {
        throw new StatusError(
          Code.RESOURCE_EXHAUSTED,
          `image root ${formatDigest(root)} holds ${plan.fileBytes} bytes of files, more than the worker's cap of ${this.options.maxBytes} (worker.expandedRootsMaxSizeBytes)`,
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
      this.roots.set(key, { size: plan.fileBytes, touchedAt: Date.now(), opened });
      this.totalBytes += plan.fileBytes;
      this.materializedCount++;
    } finally {
      // Gone already when the rename succeeded.
      await rm(work, { recursive: true, force: true });
    }
    await this.evict().catch((err: unknown) => this.options.onError?.(err));
  }

  /** Indexes the trees an earlier run completed, least recently used first; anything else there goes. */
  private async scan(): Promise<void> {
    const found: { key: string; size: number; usedAt: number; opened: Map<string, number> }[] = [];
    for (const key of await readdir(this.rootsDir)) {
      const recordPath = join(this.dirOf(key), "root.json");
      try {
        const record = JSON.parse(await readFile(recordPath, "utf8")) as Partial<RootRecord>;
        if (typeof record.size !== "number" || record.size < 0) throw new Error("no size");
        if (record.format !== ROOT_FORMAT) throw new Error("laid out by an older version, untamed");
        const opened = new Map(record.opened ?? []);
        found.push({ key, size: record.size, usedAt: (await stat(recordPath)).mtimeMs, opened });
      } catch {
        await rm(this.dirOf(key), { recursive: true, force: true });
      }
    }
    found.sort((a, b) => a.usedAt - b.usedAt);
    for (const { key, size, usedAt, opened } of found) {
      this.roots.set(key, { size, touchedAt: usedAt, opened });
      this.totalBytes += size;
    }
  }

  /** Marks a root as just used; returns whether it is present. */
  private touch(key: string): boolean {
    const entry = this.roots.get(key);
    if (!entry) return false;
    this.roots.delete(key);
    this.roots.set(key, entry);
    const now = Date.now();
    if (now - entry.touchedAt > MTIME_RESOLUTION_MS) {
      entry.touchedAt = now;
      const at = new Date(now);
      utimes(join(this.dirOf(key), "root.json"), at, at).catch(() => {});
    }
    return true;
  }

  /**
   * Brings the store back under its cap if it can. Roots in use may keep it
   * above for a while; the cap is met again as they are released.
   */
  private async evict(): Promise<void> {
    let used = this.totalBytes;
    if (used <= this.options.maxBytes) return;
    const victims: string[] = [];
    for (const [key, { size }] of this.roots) {
      if (used <= this.options.maxBytes) break;
      if (this.pins.has(key)) continue;
      victims.push(key);
      used -= size;
    }
    // Every victim leaves the index before anything is awaited, so no acquire can find one half removed.
    await Promise.all(victims.map((key) => this.remove(key)));
  }

  private async remove(key: string): Promise<void> {
    const entry = this.roots.get(key);
    if (!entry) return;
    this.roots.delete(key);
    this.totalBytes -= entry.size;
    // Renamed away first, so the root vanishes at once; a crash mid-delete leaves it in tmp/.
    const doomed = join(this.tempDir, randomUUID());
    const done = rename(this.dirOf(key), doomed)
      .then(() => rm(doomed, { recursive: true, force: true }))
      .finally(() => this.removing.delete(key));
    this.removing.set(key, done);
    await done;
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
