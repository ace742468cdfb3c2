import { randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, readFile, rename, rm, stat, unlink, utimes } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Readable } from "node:stream";
import { Code, StatusError } from "../status/status.js";

interface Entry {
  size: number;
  /** When the file's mtime was last moved forward, so restarts keep the LRU order. */
  touchedAt: number;
}

export interface LruDirectoryOptions {
  /** Evict least recently used files once the total passes this many bytes. */
  maxBytes: number;
  /** Called for each file evicted, for logs and metrics. */
  onEvict?: (key: string, size: number) => void;
}

/** How long an access may go unrecorded on disk; the in-memory order is always exact. */
const MTIME_RESOLUTION_MS = 60_000;

/**
 * A directory of immutable files addressed by relative keys, with an
 * in-memory index in least-recently-used order and a size cap.
 *
 * Files are written under `tmp/` and renamed into place, so a reader never
 * sees half a file; a crash leaves only temporaries, removed at the next
 * start. The index is rebuilt from the files' mtimes on start, which also
 * carry the LRU order across restarts.
 */
export class LruDirectory {
  private readonly entries = new Map<string, Entry>();
  private readonly createdDirs = new Set<string>();
  private totalBytes = 0;
  /** Temporary names are this process's prefix and a counter: unique without asking for randomness each time. */
  private readonly tempPrefix = randomBytes(6).toString("hex");
  private tempCounter = 0;

  private constructor(
    readonly root: string,
    private readonly options: LruDirectoryOptions,
  ) {}

  static async open(root: string, options: LruDirectoryOptions): Promise<LruDirectory> {
    const store = new LruDirectory(root, options);
    await rm(join(root, "tmp"), { recursive: true, force: true });
    await mkdir(join(root, "tmp"), { recursive: true });
    await mkdir(join(root, "files"), { recursive: true });
    await store.loadIndex();
    return store;
  }

  get usedBytes(): number {
    return this.totalBytes;
  }

  get count(): number {
    return this.entries.size;
  }

  get maxBytes(): number {
    return this.options.maxBytes;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /** Marks a file as just used; returns whether it exists. */
  touch(key: string): boolean {
    const entry = this.entries.get(key);
    if (!entry) return false;
    this.entries.delete(key);
    this.entries.set(key, entry);
    const now = Date.now();
    if (now - entry.touchedAt > MTIME_RESOLUTION_MS) {
      entry.touchedAt = now;
      const at = new Date(now);
      utimes(this.filePath(key), at, at).catch(() => this.forget(key));
    }
    return true;
  }

  sizeOf(key: string): number | undefined {
    return this.entries.get(key)?.size;
  }

  filePath(key: string): string {
    return join(this.root, "files", key);
  }

  /** A fresh path under tmp/ for a file that will be committed or removed. */
  tempPath(): string {
    return join(this.root, "tmp", `${this.tempPrefix}-${++this.tempCounter}`);
  }

  /**
   * Moves a complete temporary file into place under `key`. Concurrent
   * commits of the same key are safe: the content is the same, the last
   * rename wins, and the index counts the file once.
   */
  async commit(tempPath: string, key: string, size: number): Promise<void> {
    if (size > this.options.maxBytes) {
      await unlink(tempPath).catch(() => {});
      throw new StatusError(
        Code.RESOURCE_EXHAUSTED,
        `a file of ${size} bytes does not fit in a store capped at ${this.options.maxBytes} bytes`,
      );
    }
    const target = this.filePath(key);
    await this.ensureDir(dirname(target));
    await rename(tempPath, target);
    await this.record(key, size);
  }

  /** Writes `data` under `key` atomically. */
  async writeFile(key: string, data: Uint8Array): Promise<void> {
    const temp = this.tempPath();
    const handle = await open(temp, "wx");
    try {
      await handle.writeFile(data);
    } finally {
      await handle.close();
    }
    await this.commit(temp, key, data.byteLength);
  }

  /** Counts a file just renamed into place (once, however often it was written). */
  private async record(key: string, size: number): Promise<void> {
    const existing = this.entries.get(key);
    if (existing) {
      this.touch(key);
      return;
    }
    this.entries.set(key, { size, touchedAt: Date.now() });
    this.totalBytes += size;
    await this.evict(key);
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
    this.forget(key);
    await unlink(this.filePath(key)).catch(() => {});
  }

  private forget(key: string): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    this.totalBytes -= entry.size;
  }

  private async evict(keep: string): Promise<void> {
    if (this.totalBytes <= this.options.maxBytes) return;
    const victims: string[] = [];
    for (const [key, entry] of this.entries) {
      if (this.totalBytes <= this.options.maxBytes) break;
      if (key === keep) continue;
      victims.push(key);
      this.entries.delete(key);
      this.totalBytes -= entry.size;
      this.options.onEvict?.(key, entry.size);
    }
    // Readers that already opened a victim keep their descriptor; unlinking is safe.
    await Promise.all(victims.map((key) => unlink(this.filePath(key)).catch(() => {})));
  }

  private async ensureDir(dir: string): Promise<void> {
    if (this.createdDirs.has(dir)) return;
    await mkdir(dir, { recursive: true });
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
    found.sort((a, b) => a.mtime - b.mtime);
    for (const { key, size, mtime } of found) {
      this.entries.set(key, { size, touchedAt: mtime });
      this.totalBytes += size;
    }
    await this.evict("");
  }
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException).code === "ENOENT";
}
