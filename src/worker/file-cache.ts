import { renameSync, writeFileSync } from "node:fs";
import { chmod, mkdir, rename, rm, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Lease, PinnedLru } from "../cache/pinned-lru.js";
import { type Digest, formatDigest } from "../digest/digest.js";
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
  /** Copies on disk by key; the value is the copy's path. */
  private readonly copies: PinnedLru<string, string>;

  private constructor(
    private readonly dir: string,
    maxBytes: number,
    private readonly options: FileCacheOptions,
  ) {
    this.copies = new PinnedLru({ maxBytes, dispose: (_key, path) => unlink(path).catch(() => {}) });
  }

  static async open(dir: string, maxBytes: number, options: FileCacheOptions = {}): Promise<FileCache> {
    // Entries from an earlier run are not indexed; starting empty is always correct.
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    return new FileCache(dir, maxBytes, options);
  }

  /** Bytes of the copies on disk. */
  get usedBytes(): number {
    return this.copies.bytes;
  }

  /**
   * The cached copies of `wanted` (fetching what is absent), pinned until
   * `release`, and the digests the CAS does not have. Small files come in
   * batches, large ones streamed; those `atHand` has are written from there
   * instead.
   */
  async ensure(
    cas: RemoteCas,
    wanted: readonly { digest: Digest; executable: boolean }[],
    atHand?: BlobsAtHand,
  ): Promise<{ missing: Digest[]; release(): void }> {
    const leases: Lease<string>[] = [];
    const absent = new Map<string, { digest: Digest; executable: boolean }>();
    for (const item of wanted) {
      const key = this.key(item.digest, item.executable);
      if (absent.has(key)) continue;
      const lease = this.copies.tryAcquire(key);
      if (lease) leases.push(lease);
      else absent.set(key, item);
    }
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      // The cache shrinks back under its cap synchronously; the files go in the background.
      for (const lease of leases) void lease.release();
    };
    try {
      return { missing: await this.fetchAbsent(cas, absent, atHand, leases), release };
    } catch (err) {
      release();
      throw err;
    }
  }

  /**
   * Acquires each absent copy, fetching in one batch those no one else is
   * fetching already; leases go into `leases`, as they come. Returns the
   * digests the CAS lacks.
   */
  private async fetchAbsent(
    cas: RemoteCas,
    absent: ReadonlyMap<string, { digest: Digest; executable: boolean }>,
    atHand: BlobsAtHand | undefined,
    leases: Lease<string>[],
  ): Promise<Digest[]> {
    if (absent.size === 0) return [];
    const batch: [string, { digest: Digest; executable: boolean }][] = [];
    let settleBatch: { resolve(found: Set<string>): void; reject(err: unknown): void } | undefined;
    const batchFetched = new Promise<Set<string>>((resolve, reject) => {
      settleBatch = { resolve, reject };
    });
    let launched = false;
    const create = (item: { digest: Digest; executable: boolean }) => async (key: string) => {
      let found: Set<string>;
      if (launched) {
        // Created late, once an evicted copy of the key was unlinked: fetched on its own.
        found = await this.fetch(cas, [[key, item]], atHand);
      } else {
        batch.push([key, item]);
        found = await batchFetched;
      }
      if (!found.has(key)) throw new NotInCas();
      return { value: join(this.dir, key), size: item.digest.sizeBytes };
    };
    // Each acquire calls `create` before returning if no one else is fetching the copy: the batch fills up here.
    const acquired = [...absent].map(([key, item]) => this.copies.acquire(key, create(item)));
    launched = true;
    if (batch.length > 0) this.fetch(cas, batch, atHand).then(settleBatch?.resolve, settleBatch?.reject);
    const missing: Digest[] = [];
    let failure: unknown;
    const settled = await Promise.allSettled(acquired);
    for (const [i, [, item]] of [...absent].entries()) {
      const result = settled[i] as PromiseSettledResult<Lease<string>>;
      if (result.status === "fulfilled") leases.push(result.value);
      else if (result.reason instanceof NotInCas) missing.push(item.digest);
      else failure ??= result.reason;
    }
    if (failure !== undefined) throw failure;
    return missing;
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
    atHand: BlobsAtHand | undefined,
  ): Promise<Set<string>> {
    const found = new Set<string>();
    const small = items.filter(([, i]) => i.digest.sizeBytes <= 1024 * 1024);
    const large = items.filter(([, i]) => i.digest.sizeBytes > 1024 * 1024);
    const provided = new Map<string, Buffer>();
    if (atHand) {
      await Promise.all(
        small.map(async ([key, item]) => {
          const data = await atHand.get(item.digest);
          if (data) provided.set(key, data);
        }),
      );
    }
    const toRead = small.filter(([key]) => !provided.has(key)).map(([, i]) => i.digest);
    const blobs = await cas.readBlobs(toRead);
    await Promise.all(
      small.map(async ([key, item]) => {
        const data = provided.get(key) ?? blobs.get(item.digest);
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

/**
 * Contents of some blobs that came with the work at hand (an assignment's small input files), which the cache
 * writes instead of reading them from the CAS: undefined for one it does not have, or whose bytes do not match
 * the digest (each is checked when first asked for).
 */
export interface BlobsAtHand {
  get(digest: Digest): Promise<Buffer | undefined>;
}

/** A creation's way of saying the CAS lacks the blob: reported as missing, not as a failure. */
class NotInCas extends Error {}

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
