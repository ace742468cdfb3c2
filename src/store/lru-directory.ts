import { randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, readFile, rename, rm, stat, unlink } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Readable } from "node:stream";
import { PinnedLru } from "../cache/pinned-lru.js";
import { stampUse } from "../cache/use-stamp.js";
import { Code, StatusError } from "../status/status.js";

interface Entry {
  /** When the file's mtime was last moved forward, so restarts keep the LRU order. */
  usedAt: number;
  /**
   * Written by this process (after the writer checked it), or checked by the
   * owner since this process started. A file found on disk at start is not:
   * a crash may have left it short or damaged.
   */
  verified: boolean;
  /** Found missing on disk: leaves the index without an unlink (which could hit a new file of the key). */
  gone?: boolean;
}

export interface LruDirectoryOptions {
  /** Evict least recently used files once the total passes this many bytes. */
  maxBytes: number;
  /** Called for each file evicted, for logs and metrics. */
  onEvict?: (key: string, size: number) => void;
  /**
   * The size a key's file must have, when its name says (a blob's digest):
   * a file of another size found at start is removed, never indexed.
   */
  sizeOfKey?: (key: string) => number | undefined;
  /** Called for each file removed at start because its size was wrong. */
  onDamaged?: (key: string, reason: string) => void;
}

/**
 * A directory of immutable files addressed by relative keys, with an
 * in-memory index in least-recently-used order and a size cap.
 *
 * Files are written under `tmp/`, flushed to the disk (fsync) and renamed
 * into place, and the directory holding the new name is flushed before the
 * write is acknowledged: a reader never sees half a file, and a file
 * acknowledged survives a crash of the machine. A crash leaves temporaries,
 * removed at the next start. The index is rebuilt from the files' mtimes on
 * start, which also carry the LRU order across restarts; files found then
 * are marked unverified until their owner checks them (`markVerified`).
 */
export class LruDirectory {
  private readonly entries: PinnedLru<string, Entry>;
  private readonly createdDirs = new Set<string>();
  /** Temporary names are this process's prefix and a counter: unique without asking for randomness each time. */
  private readonly tempPrefix = randomBytes(6).toString("hex");
  private tempCounter = 0;
  /** Directory flushes not yet started, one per directory: renames in the same tick share one fsync. */
  private readonly dirSyncs = new Map<string, Promise<void>>();

  private constructor(
    readonly root: string,
    private readonly options: LruDirectoryOptions,
  ) {
    this.entries = new PinnedLru({
      maxBytes: options.maxBytes,
      dispose: (key, entry, size, reason) => {
        if (reason === "evicted") options.onEvict?.(key, size);
        // Readers that already opened the file keep their descriptor; unlinking is safe.
        if (!entry.gone) return unlink(this.filePath(key)).catch(() => {});
      },
    });
  }

  static async open(root: string, options: LruDirectoryOptions): Promise<LruDirectory> {
    const store = new LruDirectory(root, options);
    await rm(join(root, "tmp"), { recursive: true, force: true });
    await mkdir(join(root, "tmp"), { recursive: true, mode: 0o700 });
    await mkdir(join(root, "files"), { recursive: true, mode: 0o700 });
    await store.loadIndex();
    return store;
  }

  get usedBytes(): number {
    return this.entries.bytes;
  }

  get count(): number {
    return this.entries.count;
  }

  get maxBytes(): number {
    return this.options.maxBytes;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /** Marks a file as just used; returns whether it exists. */
  touch(key: string): boolean {
    const entry = this.entries.touch(key);
    if (!entry) return false;
    stampUse(entry, this.filePath(key), () => this.forget(key));
    return true;
  }

  /** Whether the file was written or checked by this process (false also when it is not stored). */
  isVerified(key: string): boolean {
    return this.entries.peek(key)?.verified === true;
  }

  /** Records that the owner checked the file's content. */
  markVerified(key: string): void {
    const entry = this.entries.peek(key);
    if (entry) entry.verified = true;
  }

  /** Keys of files not checked since this process started, least recently used first. */
  unverifiedKeys(): string[] {
    return [...this.entries.entries()].filter(({ value }) => !value.verified).map(({ key }) => key);
  }

  sizeOf(key: string): number | undefined {
    return this.entries.sizeOf(key);
  }

  filePath(key: string): string {
    return join(this.root, "files", key);
  }

  /** A fresh path under tmp/ for a file that will be committed or removed. */
  tempPath(): string {
    return join(this.root, "tmp", `${this.tempPrefix}-${++this.tempCounter}`);
  }

  /**
   * Moves a complete temporary file into place under `key`; the caller has
   * flushed its content (FileHandle.sync). Returns once the new name is on
   * disk too, unless `durable` is false (a file not flushed either, which a
   * crash may lose, see PutOptions.durable; a damaged one is caught by the
   * check of files found at start). Concurrent commits of the same key are
   * safe: the content is the same, the last rename wins, and the index counts
   * the file once.
   */
  async commit(tempPath: string, key: string, size: number, options?: { durable?: boolean }): Promise<void> {
    if (size > this.options.maxBytes) {
      await unlink(tempPath).catch(() => {});
      throw new StatusError(
        Code.RESOURCE_EXHAUSTED,
        `a file of ${size} bytes does not fit in a store capped at ${this.options.maxBytes} bytes`,
      );
    }
    const target = this.filePath(key);
    await this.ensureDir(dirname(target));
    // An evicted file of the same key may still be on its way out: its unlink must not take this one.
    await this.entries.settled(key);
    await rename(tempPath, target);
    if (options?.durable ?? true) await this.syncDir(dirname(target));
    await this.record(key, size);
  }

  /**
   * Writes `data` under `key` atomically and durably. When the disk is full,
   * least recently used files make room for it and the write is tried once more.
   */
  async writeFile(key: string, data: Uint8Array): Promise<void> {
    try {
      await this.writeTemp(key, data);
    } catch (err) {
      if (!isDiskFull(err) || (await this.makeRoom(data.byteLength, key)) === 0) throw err;
      await this.writeTemp(key, data);
    }
  }

  private async writeTemp(key: string, data: Uint8Array): Promise<void> {
    const temp = this.tempPath();
    const handle = await open(temp, "wx");
    try {
      await handle.writeFile(data);
      await handle.sync();
    } catch (err) {
      await handle.close().catch(() => {});
      await unlink(temp).catch(() => {});
      throw err;
    }
    await handle.close();
    await this.commit(temp, key, data.byteLength);
  }

  /**
   * Evicts least recently used files (never `keep`) until at least `bytes`
   * are freed, for a write the disk had no room for. Returns the bytes freed.
   */
  makeRoom(bytes: number, keep = ""): Promise<number> {
    return this.entries.free(bytes, keep);
  }

  /**
   * Flushes a directory's entries (a rename into it) to disk. Renames made
   * before the flush starts share it: it starts on the next turn of the event loop.
   */
  private syncDir(dir: string): Promise<void> {
    const pending = this.dirSyncs.get(dir);
    if (pending) return pending;
    const sync = new Promise<void>((resolve, reject) => {
      setImmediate(() => {
        this.dirSyncs.delete(dir);
        fsyncDirectory(dir).then(resolve, reject);
      });
    });
    this.dirSyncs.set(dir, sync);
    return sync;
  }

  /** Counts a file just renamed into place (once, however often it was written). */
  private async record(key: string, size: number): Promise<void> {
    if (this.touch(key)) return;
    await this.entries.insert(key, { usedAt: Date.now(), verified: true }, size);
  }

  /** The whole file, or undefined when it is not (or no longer) stored. */
  async readFile(key: string): Promise<Buffer | undefined> {
    if (!this.touch(key)) return undefined;
    try {
      return await readFile(this.filePath(key));
    } catch (err) {
      if (isNotFound(err)) {
        this.forget(key);
        return undefined;
      }
      throw err;
    }
  }

  /**
   * A stream of bytes [start, end) of the file. The file is opened before
   * this returns, so an eviction afterwards cannot cut the read short.
   */
  async openRead(key: string, start: number, end: number, highWaterMark: number): Promise<Readable | undefined> {
    if (!this.touch(key)) return undefined;
    let handle: Awaited<ReturnType<typeof open>>;
    try {
      handle = await open(this.filePath(key), "r");
    } catch (err) {
      if (isNotFound(err)) {
        this.forget(key);
        return undefined;
      }
      throw err;
    }
    if (end <= start) {
      await handle.close();
      return Readable.from([]);
    }
    // Each read allocates a whole chunk: a small blob gets a chunk of its own size, not a megabyte.
    const chunk = Math.max(1, Math.min(highWaterMark, end - start));
    return createReadStream("", { fd: handle, start, end: end - 1, highWaterMark: chunk, autoClose: true });
  }

  async remove(key: string): Promise<void> {
    if (this.entries.has(key)) await this.entries.delete(key);
    else await unlink(this.filePath(key)).catch(() => {});
  }

  /** Drops a file found missing from the index. */
  private forget(key: string): void {
    const entry = this.entries.peek(key);
    if (!entry) return;
    entry.gone = true;
    void this.entries.delete(key);
  }

  private async ensureDir(dir: string): Promise<void> {
    if (this.createdDirs.has(dir)) return;
    const first = await mkdir(dir, { recursive: true, mode: 0o700 });
    // A new directory's own name must reach the disk before a file in it counts as stored.
    if (first !== undefined) {
      for (let made = dir; made.length >= first.length; made = dirname(made)) await this.syncDir(dirname(made));
    }
    this.createdDirs.add(dir);
  }

  private async loadIndex(): Promise<void> {
    const found: { key: string; size: number; mtime: number }[] = [];
    const walk = async (dir: string, prefix: string): Promise<void> => {
      const children = await readdir(dir, { withFileTypes: true });
      await Promise.all(
        children.map(async (child) => {
          const key = prefix === "" ? child.name : `${prefix}/${child.name}`;
          const path = join(dir, child.name);
          if (child.isDirectory()) {
            this.createdDirs.add(path);
            await walk(path, key);
          } else if (child.isFile()) {
            const info = await stat(path);
            found.push({ key, size: info.size, mtime: info.mtimeMs });
          }
        }),
      );
    };
    await walk(join(this.root, "files"), "");
    const intact = [];
    for (const { key, size, mtime } of found) {
      const expected = this.options.sizeOfKey?.(key);
      if (expected !== undefined && expected !== size) {
        // Cut short (or grown) by a crash: its name promises other bytes.
        this.options.onDamaged?.(key, `the file has ${size} bytes, its name says ${expected}`);
        await unlink(join(this.root, "files", key)).catch(() => {});
        continue;
      }
      intact.push({ key, size, usedAt: mtime, value: { usedAt: mtime, verified: false } });
    }
    await this.entries.restore(intact);
  }
}

/** fsync of a directory: makes the names created or renamed in it durable. */
export async function fsyncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** The disk (or the user's quota) has no room left. */
export function isDiskFull(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === "ENOSPC" || code === "EDQUOT";
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException).code === "ENOENT";
}
