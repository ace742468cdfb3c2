import { renameSync, writeFileSync } from "node:fs";
import { chmod, mkdir, rename, rm, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Digest, digestKey, formatDigest } from "../digest/digest.js";
import type { RemoteCas } from "./remote-cas.js";

/**
 * Files up to this size are written synchronously, as input-root.ts makes
 * small trees: such a write takes microseconds, less than the two thread-pool
 * round trips (write, rename) would wait on a busy worker.
 */
const SYNC_WRITE_LIMIT = 64 * 1024;

/**
 * The worker's local copies of input files, by digest, hard-linked into
 * every action that uses them so a file is fetched once per worker. The
 * copies are owned by the worker's user and writable by nobody else, so the
 * actions (running as another, unprivileged user) cannot change them.
 * Executable and plain copies are separate files: a hard link shares its mode.
 *
 * Past `maxBytes` the least recently used copies are deleted. A copy an
 * action is about to link is pinned until `release`; one already linked
 * lives on in the action's directory (a hard link keeps the file), so
 * eviction never takes a file from under a running action.
 */
export class FileCache {
  /** Copies on disk and their sizes, least recently used first. */
  private readonly present = new Map<string, number>();
  private readonly fetching = new Map<string, Promise<boolean>>();
  private readonly pins = new Map<string, number>();
  private totalBytes = 0;

  private constructor(
    private readonly dir: string,
    private readonly maxBytes: number,
    private readonly options: FileCacheOptions,
  ) {}

  static async open(dir: string, maxBytes: number, options: FileCacheOptions = {}): Promise<FileCache> {
    // Entries from an earlier run are not indexed; starting empty is always correct.
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    return new FileCache(dir, maxBytes, options);
  }

  /** Bytes of the copies on disk. */
  get usedBytes(): number {
    return this.totalBytes;
  }

  /**
   * The cached copies of `wanted` (fetching what is absent), pinned until
   * `release`, and the digests the CAS does not have. Small files come in
   * batches, large ones streamed; those in `atHand` (verified contents by
   * digest key) are written from there instead.
   */
  async ensure(
    cas: RemoteCas,
    wanted: readonly { digest: Digest; executable: boolean }[],
    atHand?: ReadonlyMap<string, Buffer>,
  ): Promise<{ missing: Digest[]; release(): void }> {
    const keys = [...new Set(wanted.map((item) => this.key(item.digest, item.executable)))];
    for (const key of keys) this.pins.set(key, (this.pins.get(key) ?? 0) + 1);
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      for (const key of keys) {
        const count = (this.pins.get(key) ?? 1) - 1;
        if (count > 0) this.pins.set(key, count);
        else this.pins.delete(key);
      }
      this.evict();
    };
    try {
      return { missing: await this.fetchAbsent(cas, wanted, atHand), release };
    } catch (err) {
      release();
      throw err;
    }
  }

  private async fetchAbsent(
    cas: RemoteCas,
    wanted: readonly { digest: Digest; executable: boolean }[],
    atHand: ReadonlyMap<string, Buffer> | undefined,
  ): Promise<Digest[]> {
    const missing: Digest[] = [];
    const toFetch = new Map<string, { digest: Digest; executable: boolean }>();
    const waits: Promise<void>[] = [];
    for (const item of wanted) {
      const key = this.key(item.digest, item.executable);
      const size = this.present.get(key);
      if (size !== undefined) {
        // Most recently used now.
        this.present.delete(key);
        this.present.set(key, size);
        continue;
      }
      if (toFetch.has(key)) continue;
      const pending = this.fetching.get(key);
      if (pending) {
        waits.push(
          pending.then((ok) => {
            if (!ok) missing.push(item.digest);
          }),
        );
      } else {
        toFetch.set(key, item);
      }
    }
    if (toFetch.size > 0) {
      const fetched = this.fetch(cas, [...toFetch.entries()], atHand);
      for (const [key, item] of toFetch) {
        const done = fetched.then((found) => found.has(key));
        this.fetching.set(key, done);
        waits.push(
          done.then((ok) => {
            this.fetching.delete(key);
            if (ok) this.add(key, item.digest.sizeBytes);
            else missing.push(item.digest);
          }),
        );
      }
    }
    await Promise.all(waits);
    return missing;
  }

  private add(key: string, size: number): void {
    this.present.set(key, size);
    this.totalBytes += size;
    this.evict();
  }

  /** Deletes the least recently used copies no action has pinned until the cache fits. */
  private evict(): void {
    for (const [key, size] of this.present) {
      if (this.totalBytes <= this.maxBytes) return;
      if (this.pins.has(key)) continue;
      this.present.delete(key);
      this.totalBytes -= size;
      unlink(join(this.dir, key)).catch(() => {});
    }
  }

  pathOf(digest: Digest, executable: boolean): string {
    return join(this.dir, this.key(digest, executable));
  }

  private modeOf(executable: boolean): number {
    const mode = executable ? 0o555 : 0o444;
    return this.options.ownerWrites ? mode | 0o200 : mode;
  }

  private key(digest: Digest, executable: boolean): string {
    return `${digest.fn.name}-${digest.hash}-${digest.sizeBytes}${executable ? "-x" : ""}`;
  }

  private async fetch(
    cas: RemoteCas,
    items: [string, { digest: Digest; executable: boolean }][],
    atHand: ReadonlyMap<string, Buffer> | undefined,
  ): Promise<Set<string>> {
    const found = new Set<string>();
    const small = items.filter(([, i]) => i.digest.sizeBytes <= 1024 * 1024);
    const large = items.filter(([, i]) => i.digest.sizeBytes > 1024 * 1024);
    const toRead = small.filter(([, i]) => !atHand?.has(digestKey(i.digest))).map(([, i]) => i.digest);
    const blobs = await cas.readBlobs(toRead);
    await Promise.all(
      small.map(async ([key, item]) => {
        const data = atHand?.get(digestKey(item.digest)) ?? blobs.get(item.digest);
        if (!data) return;
        const path = join(this.dir, key);
        const temp = `${path}.part`;
        const mode = this.modeOf(item.executable);
        if (data.byteLength <= SYNC_WRITE_LIMIT) {
          writeFileSync(temp, data, { mode });
          renameSync(temp, path);
        } else {
          await writeFile(temp, data, { mode });
          await rename(temp, path);
        }
        found.add(key);
      }),
    );
    for (const [key, item] of large) {
      const path = join(this.dir, key);
      if (await cas.readToFile(item.digest, path)) {
        await chmod(path, this.modeOf(item.executable));
        found.add(key);
      }
    }
    return found;
  }
}

export interface FileCacheOptions {
  /**
   * Gives the copies their owner's write bit (0644, 0755), as a source file
   * in a workspace has, so that a copy an action makes of an input (`cp x
   * tmp.txt`, which keeps the mode) is one it can write to, as under Bazel's
   * own sandbox and remote worker. Only for a cache whose owner (root) is not
   * the actions' user: they still can neither write nor chmod the copies.
   * Without it the copies are 0444 and 0555.
   */
  ownerWrites?: boolean;
}

export function describeMissing(digests: readonly Digest[]): string[] {
  return digests.map((d) => `blobs/${formatDigest(d)}`);
}
