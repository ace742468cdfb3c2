import { closeSync, fdatasync, ftruncateSync, openSync, readSync, writeSync } from "node:fs";
import { mkdir, readdir, stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { fsyncDirectory } from "./lru-directory.js";

const fdatasyncAsync = promisify(fdatasync);

export interface SegmentLogOptions {
  /** Segments are dropped, oldest first, once their files hold more than this. */
  maxBytes: number;
  /** A segment is closed and the next one started past this size. */
  segmentBytes: number;
  /** Called for each record that leaves with an evicted segment. */
  onEvict?: (key: string, size: number) => void;
}

interface Location {
  segment: number;
  /** Where the record's data starts in its segment file. */
  offset: number;
  size: number;
  /** Appended by this process, or checked by the owner since it started (a crash may have damaged older ones). */
  verified: boolean;
}

interface Segment {
  readonly id: number;
  readonly fd: number;
  bytes: number;
}

/** Each record: MAGIC, key length (u16), data length (u32), key (UTF-8), data. */
const MAGIC = 0x42524c31; // "BRL1"
const HEADER_BYTES = 10;
const SEGMENT_NAME = /^([0-9]{10})\.log$/;

/**
 * Small immutable values by key, appended to a few large segment files
 * instead of a file each. Creating a file costs an inode allocation, and on
 * a busy file system (and on this project's test machines' ext4 in
 * particular) that was most of the cost of storing the thousands of small
 * blobs a build uploads; an append to an open file costs a copy into the
 * page cache.
 *
 * The index lives in memory and is rebuilt on open by reading the records'
 * headers; a record cut short by a crash ends its segment there. Eviction
 * drops whole segments, oldest first; a value used while it sits in the older
 * half of the segments is copied to the newest one, so what is used stays.
 * Writes and reads are synchronous: each is one system call on a small value
 * in the page cache, cheaper than a round trip through the thread pool.
 * Durability is a group commit: `sync()` flushes every append made before it
 * starts with one fdatasync per segment written, shared by all the callers
 * waiting on it.
 */
export class SegmentLog {
  private readonly index = new Map<string, Location>();
  private readonly segments = new Map<number, Segment>();
  private current: Segment | undefined;
  private totalBytes = 0;
  /** Segments appended to since their last flush, and whether a new segment's name must be flushed too. */
  private readonly dirty = new Set<Segment>();
  private dirDirty = false;
  /** The flush not yet started, which later appends may still join. */
  private pendingSync: Promise<void> | undefined;

  private constructor(
    private readonly dir: string,
    private readonly options: SegmentLogOptions,
  ) {}

  static async open(dir: string, options: SegmentLogOptions): Promise<SegmentLog> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const log = new SegmentLog(dir, options);
    const ids = (await readdir(dir))
      .map((name) => SEGMENT_NAME.exec(name)?.[1])
      .filter((id): id is string => id !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
    for (const id of ids) await log.load(id);
    log.evict();
    return log;
  }

  get usedBytes(): number {
    return this.totalBytes;
  }

  get count(): number {
    return this.index.size;
  }

  has(key: string): boolean {
    return this.index.has(key);
  }

  /** Marks a value as used (copying it forward when its segment is old); returns whether it is stored. */
  touch(key: string): boolean {
    const location = this.index.get(key);
    if (!location) return false;
    if (this.isOld(location.segment)) {
      const data = this.read(location);
      if (data) this.copyForward(key, data, location.verified);
    }
    return true;
  }

  /** The value, or undefined when it is not stored. */
  get(key: string): Buffer | undefined {
    const location = this.index.get(key);
    if (!location) return undefined;
    const data = this.read(location);
    if (data && this.isOld(location.segment)) this.copyForward(key, data, location.verified);
    return data;
  }

  /**
   * Stores a value under `key`; a key already stored keeps its value. It is
   * readable at once, and on disk once a `sync()` called afterwards resolves.
   */
  put(key: string, data: Uint8Array): void {
    if (this.index.has(key)) return;
    this.append(key, data);
  }

  /**
   * Resolves once every value put before this call is on disk. Calls in the
   * same turn of the event loop share one flush (a group commit).
   */
  sync(): Promise<void> {
    if (this.pendingSync) return this.pendingSync;
    const flush = new Promise<void>((resolve, reject) => {
      setImmediate(() => {
        this.pendingSync = undefined;
        this.flush().then(resolve, reject);
      });
    });
    this.pendingSync = flush;
    return flush;
  }

  private async flush(): Promise<void> {
    const segments = [...this.dirty];
    this.dirty.clear();
    const dirDirty = this.dirDirty;
    this.dirDirty = false;
    // An evicted segment's descriptor is closed: its records are gone anyway.
    await Promise.all(
      segments.filter((s) => this.segments.get(s.id) === s).map((s) => fdatasyncAsync(s.fd).catch(ignoreClosed)),
    );
    if (dirDirty) await fsyncDirectory(this.dir);
  }

  /** Whether the value was appended or checked by this process (false also when it is not stored). */
  isVerified(key: string): boolean {
    return this.index.get(key)?.verified === true;
  }

  /** Records that the owner checked the value's bytes. */
  markVerified(key: string): void {
    const location = this.index.get(key);
    if (location) location.verified = true;
  }

  /** Forgets a value (its bytes stay in the segment until the segment goes). */
  remove(key: string): void {
    this.index.delete(key);
  }

  close(): void {
    for (const segment of this.segments.values()) closeSync(segment.fd);
    this.segments.clear();
    this.current = undefined;
  }

  /** Keeps a used value away from eviction; when the disk is full it stays where it is. */
  private copyForward(key: string, data: Buffer, verified: boolean): void {
    try {
      this.append(key, data, verified);
    } catch {
      // The old copy is still indexed and whole; it will be evicted sooner, that is all.
    }
  }

  /** `verified`: false for a copy of a value nobody checked yet; the copy stays unchecked. */
  private append(key: string, data: Uint8Array, verified = true): void {
    const keyBytes = Buffer.from(key, "utf8");
    const record = Buffer.allocUnsafe(HEADER_BYTES + keyBytes.byteLength + data.byteLength);
    record.writeUInt32BE(MAGIC, 0);
    record.writeUInt16BE(keyBytes.byteLength, 4);
    record.writeUInt32BE(data.byteLength, 6);
    keyBytes.copy(record, HEADER_BYTES);
    record.set(data, HEADER_BYTES + keyBytes.byteLength);
    let segment = this.current;
    if (!segment || segment.bytes + record.byteLength > this.options.segmentBytes) segment = this.startSegment();
    const at = segment.bytes;
    let written = 0;
    try {
      while (written < record.byteLength) {
        written += writeSync(segment.fd, record, written, record.byteLength - written, at + written);
      }
    } catch (err) {
      // A full disk: nothing of a partial record may stay behind the last whole one.
      if (written > 0) ftruncateSync(segment.fd, at);
      throw err;
    }
    segment.bytes += record.byteLength;
    this.dirty.add(segment);
    this.totalBytes += record.byteLength;
    // Delete first, so that the key moves to the end of the map: its order is the order of use.
    this.index.delete(key);
    this.index.set(key, {
      segment: segment.id,
      offset: at + HEADER_BYTES + keyBytes.byteLength,
      size: data.byteLength,
      verified,
    });
    this.evict();
  }

  private read(location: Location): Buffer | undefined {
    const segment = this.segments.get(location.segment);
    if (!segment) return undefined;
    const data = Buffer.allocUnsafe(location.size);
    let done = 0;
    while (done < location.size) {
      const read = readSync(segment.fd, data, done, location.size - done, location.offset + done);
      if (read === 0) return undefined;
      done += read;
    }
    return data;
  }

  /** In the older half of the segments, which eviction reaches first. */
  private isOld(id: number): boolean {
    const newest = this.current?.id ?? id;
    return newest - id >= Math.max(1, Math.floor(this.segments.size / 2));
  }

  private startSegment(): Segment {
    const id = (this.current?.id ?? 0) + 1;
    const fd = openSync(this.segmentPath(id), "wx+");
    const segment = { id, fd, bytes: 0 };
    this.segments.set(id, segment);
    this.current = segment;
    this.dirDirty = true;
    return segment;
  }

  private evict(): void {
    while (this.totalBytes > this.options.maxBytes && this.segments.size > 1) {
      const oldest = Math.min(...this.segments.keys());
      const segment = this.segments.get(oldest) as Segment;
      for (const [key, location] of this.index) {
        if (location.segment !== oldest) continue;
        this.index.delete(key);
        this.options.onEvict?.(key, location.size);
      }
      this.segments.delete(oldest);
      this.totalBytes -= segment.bytes;
      closeSync(segment.fd);
      unlink(this.segmentPath(oldest)).catch(() => {});
    }
  }

  /** Indexes one segment's records; a torn last record is cut off. */
  private async load(id: number): Promise<void> {
    const path = this.segmentPath(id);
    const size = (await stat(path)).size;
    const fd = openSync(path, "r+");
    const header = Buffer.alloc(HEADER_BYTES);
    let at = 0;
    while (at + HEADER_BYTES <= size) {
      if (readSync(fd, header, 0, HEADER_BYTES, at) < HEADER_BYTES || header.readUInt32BE(0) !== MAGIC) break;
      const keyLength = header.readUInt16BE(4);
      const dataLength = header.readUInt32BE(6);
      const end = at + HEADER_BYTES + keyLength + dataLength;
      if (end > size) break;
      const keyBytes = Buffer.alloc(keyLength);
      readSync(fd, keyBytes, 0, keyLength, at + HEADER_BYTES);
      const key = keyBytes.toString("utf8");
      this.index.delete(key);
      this.index.set(key, { segment: id, offset: at + HEADER_BYTES + keyLength, size: dataLength, verified: false });
      at = end;
    }
    if (at < size) ftruncateSync(fd, at);
    const segment = { id, fd, bytes: at };
    this.segments.set(id, segment);
    this.totalBytes += at;
    if (!this.current || id > this.current.id) this.current = segment;
  }

  private segmentPath(id: number): string {
    return join(this.dir, `${String(id).padStart(10, "0")}.log`);
  }
}

/** A segment evicted (its descriptor closed) while its flush waited: its records are gone anyway. */
function ignoreClosed(err: unknown): void {
  if ((err as NodeJS.ErrnoException).code !== "EBADF") throw err;
}
