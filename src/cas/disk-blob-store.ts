import { constants } from "node:fs";
import { copyFile, type FileHandle, open, readFile, stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { type Digest, digestKey, digestOf, formatDigest, verifyBlob } from "../digest/digest.js";
import { digestFunctionByName, type Hasher, hashBytes } from "../digest/functions.js";
import { Code, StatusError } from "../status/status.js";
import { isDiskFull, LruDirectory } from "../store/lru-directory.js";
import { SegmentLog } from "../store/segment-log.js";
import type { BlobStore, BlobWriter, PutOptions } from "./blob-store.js";
import { isEmptyBlob } from "./empty-blob.js";
import { type FileHash, type FollowedFileHash, HashThread } from "./hash-thread.js";

/** Read chunk size: large enough for throughput, well under gRPC's 4 MiB message limit. */
const READ_CHUNK_BYTES = 1024 * 1024;

/** Enough overlap to keep the disk busy while the next chunks arrive, bounded in memory. */
const MAX_WRITES_IN_FLIGHT = 4;

/**
 * Feeds the file behind `handle` to `hasher`, the next chunk read while one
 * is hashed (reads go to libuv's threads, hashing happens here); returns the
 * bytes read. Stops a chunk past `expected`: a longer file is wrong anyway.
 */
async function hashFileInto(handle: FileHandle, hasher: Hasher, expected: number): Promise<number> {
  const chunk = Math.max(1, Math.min(HASH_CHUNK_BYTES, expected + 1));
  const buffers = [Buffer.allocUnsafe(chunk), Buffer.allocUnsafe(chunk)];
  let size = 0;
  let reading = handle.read(buffers[0] as Buffer, 0, chunk, 0);
  for (let i = 0; ; i++) {
    const { bytesRead, buffer } = await reading;
    if (bytesRead === 0) return size;
    size += bytesRead;
    if (size > expected) return size;
    // A short read of a regular file is its end: no read more just to be told so (a small blob costs one).
    const more = bytesRead === chunk;
    if (more) reading = handle.read(buffers[(i + 1) % 2] as Buffer, 0, chunk, size);
    try {
      // The read above fills the other buffer; this one is reused only after update() returned.
      hasher.update(buffer.subarray(0, bytesRead));
    } catch (err) {
      if (more) await reading.catch(() => {});
      throw err;
    }
    if (!more) return size;
  }
}

/** Writes the chunks at `position` with one writev when it writes them all, as it does to a regular file. */
async function writeFully(handle: FileHandle, chunks: readonly Uint8Array[], position: number): Promise<void> {
  const total = chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0);
  const { bytesWritten } =
    chunks.length === 1
      ? await handle.write(chunks[0] as Uint8Array, 0, total, position)
      : await handle.writev(chunks as Uint8Array[], position);
  if (bytesWritten === total) return;
  // A short write: the rest, a chunk (or what is left of one) at a time.
  let skip = bytesWritten;
  let at = position + bytesWritten;
  for (const chunk of chunks) {
    if (skip >= chunk.byteLength) {
      skip -= chunk.byteLength;
      continue;
    }
    for (let offset = skip; offset < chunk.byteLength; ) {
      const written = (await handle.write(chunk, offset, chunk.byteLength - offset, at)).bytesWritten;
      offset += written;
      at += written;
    }
    skip = 0;
  }
}

/**
 * A large upload starts flushing its file every this many bytes, in the
 * background: the disk writes while the rest arrives, and the flush that
 * acknowledges the blob waits for the tail only.
 */
const EARLY_FLUSH_BYTES = 32 * 1024 * 1024;

/** Blob files checked at once when many unchecked ones are asked for (FindMissingBlobs after a restart). */
const VERIFY_CONCURRENCY = 4;

/**
 * Blob files the background check at start has in hand at once. It hashes
 * them on one thread of its own (a core at most, so a 2-core host keeps one
 * for requests); two keep that thread's queue from running dry while the
 * event loop takes in an answer.
 */
const BACKGROUND_VERIFY_CONCURRENCY = 2;

/** Bytes read at a time when a blob file is hashed: each read is one system call, two are in flight per file. */
const HASH_CHUNK_BYTES = 1024 * 1024;

/** Blobs up to this size go to the segment log; larger ones get a file each. */
export const LOGGED_BLOB_BYTES = 64 * 1024;

export interface DiskBlobStoreOptions {
  /** Blob files and the log together stay within this. */
  maxBytes: number;
  /** Called for each blob evicted. */
  onEvict?: (key: string, size: number) => void;
  /** Called for each stored blob found damaged (and dropped): its key and what was wrong. */
  onDamaged?: (key: string, reason: string) => void;
}

/** The digest a blob's key names (`fn/xx/hash-size`), or undefined for a name that is no blob's. */
export function digestOfKey(key: string): Digest | undefined {
  const match = /^([a-z0-9]+)\/[0-9a-f]{2}\/([0-9a-f]+)-([0-9]+)$/.exec(key);
  const fn = match && digestFunctionByName(match[1] as string);
  if (!match || !fn || (match[2] as string).length !== fn.hexLength) return undefined;
  return { fn, hash: match[2] as string, sizeBytes: Number(match[3]) };
}

/**
 * The part of the cap for the log of small blobs. Builds upload far more
 * small blobs than large ones, but they are a small part of the bytes.
 */
const LOG_SHARE = 0.25;

/**
 * The embedded CAS: small blobs (the Directory, Action and Command messages
 * and small files of builds, by far the most blobs) appended to a segment
 * log, larger ones as files in an LRU-capped directory.
 *
 * Trust: a blob is reported present or served only when it was written and
 * checked by this process, or its bytes on disk were hashed since this
 * process started. What a crash left behind (a file cut short, a damaged
 * file or record) is found at its first use, dropped and reported missing.
 * Durability: a blob is on disk (file and name flushed, or the log's group
 * commit done) before `put` or a writer's `commit` resolves.
 */
export class DiskBlobStore implements BlobStore {
  /** Checks of unverified blob files under way, so concurrent requests share one. */
  private readonly checking = new Map<string, Promise<boolean>>();
  /** Where the background check hashes, off the event loop. */
  private readonly hashThread = new HashThread();
  /** Where large uploads are hashed from their files: a thread apart, not queued behind the background check. */
  private readonly uploadHashThread = new HashThread();
  private closed = false;

  /** `logLimit`: blobs up to this size go to the log (0: none do). `dir`: where the store lives, for messages. */
  constructor(
    private readonly files: LruDirectory,
    private readonly log: SegmentLog,
    private readonly logLimit: number,
    private readonly dir = files.root,
    private readonly onDamaged: (key: string, reason: string) => void = () => {},
  ) {}

  /**
   * The store in `dir` (files in dir/files, the log in dir/log), created
   * when absent. The log drops a sixteenth of itself at a time, so it never
   * holds more than that over its share; a store too small for sixteen of the
   * largest logged blobs keeps every blob as a file.
   */
  static async open(dir: string, options: DiskBlobStoreOptions): Promise<DiskBlobStore> {
    const segmentBytes = Math.min(64 * 1024 ** 2, Math.floor((options.maxBytes * LOG_SHARE) / 16));
    const logged = segmentBytes > LOGGED_BLOB_BYTES;
    const logBytes = logged ? Math.floor(options.maxBytes * LOG_SHARE) : 0;
    const onDamaged = options.onDamaged ?? (() => {});
    const files = await LruDirectory.open(dir, {
      maxBytes: options.maxBytes - logBytes,
      onEvict: options.onEvict,
      sizeOfKey: (key) => digestOfKey(key)?.sizeBytes,
      onDamaged,
    });
    const log = await SegmentLog.open(join(dir, "log"), { maxBytes: logBytes, segmentBytes, onEvict: options.onEvict });
    return new DiskBlobStore(files, log, logged ? LOGGED_BLOB_BYTES : 0, dir, onDamaged);
  }

  /** Blob files found at start and not checked yet. */
  get unverifiedCount(): number {
    return this.files.unverifiedKeys().length;
  }

  /**
   * Checks every blob file found at start, most recently used first (the
   * likeliest to be asked for next), on the hash thread: a background task,
   * off the event loop; requests check what they need themselves, sooner.
   * Resolves when done or when the store closes.
   */
  async verifyAll(): Promise<{ checked: number; dropped: number }> {
    const keys = this.files.unverifiedKeys().reverse();
    let next = 0;
    let checked = 0;
    let dropped = 0;
    const lane = async (): Promise<void> => {
      while (!this.closed && next < keys.length) {
        const digest = digestOfKey(keys[next++] as string);
        if (!digest) continue;
        checked++;
        if (!(await this.checkFile(digest, true))) dropped++;
      }
    };
    await Promise.all(Array.from({ length: BACKGROUND_VERIFY_CONCURRENCY }, lane));
    return { checked, dropped };
  }

  /** Blobs stored, and their bytes. */
  get usage(): { count: number; bytes: number } {
    return { count: this.files.count + this.log.count, bytes: this.files.usedBytes + this.log.usedBytes };
  }

  /** Closes the log's files; the store is not used afterwards. */
  close(): void {
    this.closed = true;
    this.log.close();
    void this.hashThread.close();
    void this.uploadHashThread.close();
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    const missing: Digest[] = [];
    const unchecked: Digest[] = [];
    for (const digest of digests) {
      if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) continue;
      const key = digestKey(digest);
      if (this.log.has(key)) {
        if (this.log.isVerified(key) ? this.log.touch(key) : await this.fromLog(digest)) continue;
      }
      if (!this.files.has(key)) missing.push(digest);
      else if (this.files.isVerified(key)) this.files.touch(key);
      else unchecked.push(digest);
    }
    // Files found at start are hashed once each, a few at a time; the answer keeps the request's order.
    const bad = new Set<Digest>();
    for (let i = 0; i < unchecked.length; i += VERIFY_CONCURRENCY) {
      const batch = unchecked.slice(i, i + VERIFY_CONCURRENCY);
      const ok = await Promise.all(batch.map((digest) => this.checkFile(digest)));
      batch.forEach((digest, j) => {
        if (ok[j]) this.files.touch(digestKey(digest));
        else bad.add(digest);
      });
    }
    if (bad.size === 0) return missing;
    for (const digest of missing) bad.add(digest);
    return digests.filter((d) => bad.has(d));
  }

  async get(digest: Digest): Promise<Buffer | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Buffer.alloc(0);
    const logged = await this.fromLog(digest);
    if (logged) return logged;
    const key = digestKey(digest);
    if (this.files.isVerified(key)) return this.files.readFile(key);
    if (!this.files.has(key)) return undefined;
    // Read and checked in one go: the bytes returned are the bytes hashed.
    const data = await this.files.readFile(key);
    if (!data) return undefined;
    const hash = await hashBytes(digest.fn, data);
    if (data.byteLength === digest.sizeBytes && hash === digest.hash) {
      this.files.markVerified(key);
      return data;
    }
    await this.drop(key, `its ${digest.fn.name} is ${hash}`);
    return undefined;
  }

  async openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Readable.from([]);
    const end = limit === 0 ? digest.sizeBytes : Math.min(digest.sizeBytes, offset + limit);
    const logged = await this.fromLog(digest);
    if (logged) return Readable.from([logged.subarray(Math.min(offset, end), end)]);
    const key = digestKey(digest);
    if (this.files.has(key) && !this.files.isVerified(key) && !(await this.checkFile(digest))) return undefined;
    return this.files.openRead(key, offset, end, READ_CHUNK_BYTES);
  }

  async put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void> {
    if (!options?.hashedByCaller) await verifyBlob(digest, data, "data");
    if (digest.sizeBytes === 0) return;
    const key = digestKey(digest);
    if (this.log.isVerified(key) && this.log.touch(key)) return;
    if (this.files.isVerified(key) && this.files.touch(key)) return;
    // Stored but never checked (found at start): the new bytes replace it, checked.
    const durable = options?.durable ?? true;
    try {
      await this.store(key, data, durable);
    } catch (err) {
      if (!isDiskFull(err)) throw err;
      // Room made at the expense of the least recently used blob files, and one more try.
      if ((await this.files.makeRoom(data.byteLength, key)) === 0) throw this.diskFull(err, digest);
      try {
        await this.store(key, data, durable);
      } catch (again) {
        throw isDiskFull(again) ? this.diskFull(again, digest) : again;
      }
    }
  }

  private async store(key: string, data: Uint8Array, durable: boolean): Promise<void> {
    if (data.byteLength <= this.logLimit) {
      this.log.remove(key);
      this.log.put(key, data);
      const flushed = this.log.sync();
      if (durable) await flushed;
      // Not flushed is what a crash would lose anyway, with the write-behind entry naming it.
      else flushed.catch(() => {});
    } else {
      if (this.files.has(key)) await this.files.remove(key);
      await this.files.writeFile(key, data);
    }
  }

  /** RESOURCE_EXHAUSTED for a blob the disk had no room for, even after eviction. */
  diskFull(err: unknown, digest: Digest): StatusError {
    const code = (err as NodeJS.ErrnoException).code;
    return new StatusError(
      Code.RESOURCE_EXHAUSTED,
      `no room to store blob ${formatDigest(digest)}: the file system of the data directory ${this.dir} is full ` +
        `(${code}), also after evicting the least recently used blobs; free space there or lower cas.maxSizeBytes`,
    );
  }

  /** Makes room for `bytes` more by evicting blob files (for a writer whose disk is full); the bytes freed. */
  makeRoom(bytes: number): Promise<number> {
    return this.files.makeRoom(bytes);
  }

  /**
   * Hashes an unchecked blob file: true (and marked checked) when it is the
   * blob its name says; otherwise it is removed. Concurrent calls share one check.
   */
  private checkFile(digest: Digest, onThread = false): Promise<boolean> {
    const key = digestKey(digest);
    if (this.files.isVerified(key)) return Promise.resolve(true);
    if (!this.files.has(key)) return Promise.resolve(false);
    let check = this.checking.get(key);
    if (!check) {
      check = this.hashFile(digest, onThread).finally(() => this.checking.delete(key));
      this.checking.set(key, check);
    }
    return check;
  }

  /**
   * `onThread`: on the hash thread (the background check), so that requests
   * never wait behind it on the event loop; a request's own check hashes
   * here, sooner than behind the thread's queue.
   */
  private async hashFile(digest: Digest, onThread: boolean): Promise<boolean> {
    const key = digestKey(digest);
    let result: FileHash | undefined;
    if (onThread && !this.closed && HashThread.supports(digest.fn.name)) {
      // A thread that failed (it should not) leaves the file to the event loop.
      result = await this.hashThread
        .hashFile(this.files.filePath(key), digest.fn.name, digest.sizeBytes)
        .catch(() => undefined);
    }
    result ??= await this.hashHere(digest);
    if (result === "ENOENT") {
      await this.files.remove(key);
      return false;
    }
    const { hash, size } = result;
    // Written again meanwhile (a new upload replaces an unchecked file): that one was checked by its writer.
    if (this.files.isVerified(key)) return true;
    if (size === digest.sizeBytes && hash === digest.hash) {
      this.files.markVerified(key);
      return true;
    }
    await this.drop(key, size === digest.sizeBytes ? `its ${digest.fn.name} is ${hash}` : `it has ${size} bytes`);
    return false;
  }

  /** Hashes a blob file on the event loop, a chunk at a time. */
  private async hashHere(digest: Digest): Promise<FileHash> {
    const hasher = await digest.fn.createHasher();
    let handle: FileHandle;
    try {
      handle = await open(this.files.filePath(digestKey(digest)), "r");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      return "ENOENT";
    }
    try {
      const size = await hashFileInto(handle, hasher, digest.sizeBytes);
      return { hash: hasher.digestHex(), size };
    } finally {
      await handle.close();
    }
  }

  private async drop(key: string, reason: string): Promise<void> {
    this.onDamaged(key, `the stored blob file is damaged (${reason}); dropped`);
    await this.files.remove(key);
  }

  /** Forgets a blob, as if evicted (for repairs and tests). */
  async remove(digest: Digest): Promise<void> {
    const key = digestKey(digest);
    this.log.remove(key);
    await this.files.remove(key);
  }

  /**
   * A logged blob, checked against its digest the first time this process
   * reads it: a segment written before a crash may hold bytes that never
   * reached the disk. A blob that fails is forgotten, as if it had been
   * evicted. Once checked (or appended by this process) a record is served
   * without hashing again: records are never rewritten in place (the log
   * only appends, and a value used again is copied forward with its flag),
   * the segment files are open to root only in a 0700 data directory, and a
   * record damaged under a running farm by root or the disk itself is outside
   * what the store promises (as for blob files: checked again at the next
   * start).
   */
  private async fromLog(digest: Digest): Promise<Buffer | undefined> {
    const key = digestKey(digest);
    const data = this.log.get(key);
    if (!data) return undefined;
    // The size still guards against a record the index maps to the wrong bytes.
    if (this.log.isVerified(key) && data.byteLength === digest.sizeBytes) return data;
    try {
      await verifyBlob(digest, data, "stored blob");
      this.log.markVerified(key);
      return data;
    } catch {
      this.onDamaged(key, "the logged blob's bytes do not match its digest; dropped");
      this.log.remove(key);
      return undefined;
    }
  }

  async adoptFile(digest: Digest, path: string, options?: { durable?: boolean }): Promise<void> {
    const durable = options?.durable ?? true;
    try {
      const size = (await stat(path)).size;
      if (size !== digest.sizeBytes) {
        throw new StatusError(
          Code.INVALID_ARGUMENT,
          `the file taken in as blob ${formatDigest(digest)} has ${size} bytes, not ${digest.sizeBytes}`,
        );
      }
      const key = digestKey(digest);
      if (digest.sizeBytes <= this.logLimit) {
        await this.put(digest, await readFile(path), { hashedByCaller: true, durable });
        return;
      }
      if (this.files.isVerified(key) && this.files.touch(key)) return;
      if (durable) {
        const handle = await open(path, "r+");
        try {
          await handle.sync();
        } finally {
          await handle.close();
        }
      }
      // An unchecked file of the same name (found at start) is replaced by this checked one.
      if (this.files.has(key)) await this.files.remove(key);
      // A rename: no new blocks, so a full disk does not stop it (the directory of a new prefix aside).
      try {
        await this.files.commit(path, key, digest.sizeBytes, { durable });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EXDEV") throw err;
        // Another file system: a copy in the store's own temporary directory is moved instead.
        const copy = this.files.tempPath();
        await copyFile(path, copy, constants.COPYFILE_EXCL);
        try {
          await this.files.commit(copy, key, digest.sizeBytes, { durable });
        } catch (again) {
          await unlink(copy).catch(() => {});
          throw again;
        }
      }
    } catch (err) {
      throw isDiskFull(err) ? this.diskFull(err, digest) : err;
    } finally {
      await unlink(path).catch(() => {});
    }
  }

  async createWriter(digest: Digest, options?: { durable?: boolean }): Promise<BlobWriter> {
    const durable = options?.durable ?? true;
    if (digest.sizeBytes <= this.logLimit) return new MemoryBlobWriter(digest, this, durable);
    const temp = this.files.tempPath();
    let handle: FileHandle;
    try {
      handle = await open(temp, "wx");
    } catch (err) {
      throw isDiskFull(err) ? this.diskFull(err, digest) : err;
    }
    const hash =
      digest.sizeBytes >= THREAD_HASH_BYTES && HashThread.supports(digest.fn.name)
        ? followedHash(this.uploadHashThread.followFile(temp, digest.fn.name))
        : passingHash(await digest.fn.createHasher());
    return new DiskBlobWriter(digest, temp, handle, hash, this.files, this, durable);
  }
}

class DiskBlobWriter implements BlobWriter {
  written = 0;
  private done = false;
  private readonly inFlight: Promise<void>[] = [];
  /** The one eviction this upload may cause when the disk is full: the bytes it freed. */
  private roomMade: Promise<number> | undefined;
  /** A flush started while the upload goes on, so that the one at commit finds little left to write. */
  private earlyFlush: Promise<void> | undefined;
  private unflushed = 0;
  /** Writes not yet known done, in the order of their positions (they may finish in another). */
  private readonly unfinished: { end: number; done: boolean }[] = [];
  /** How far the hash was told the file is written. */
  private reported = 0;

  constructor(
    readonly digest: Digest,
    private readonly temp: string,
    private readonly handle: FileHandle,
    private readonly hasher: UploadHash,
    private readonly files: LruDirectory,
    private readonly store: DiskBlobStore,
    private readonly durable: boolean,
  ) {}

  write(chunk: Uint8Array): Promise<void> {
    return this.writeAll([chunk]);
  }

  async writeAll(chunks: readonly Uint8Array[]): Promise<void> {
    let bytes = 0;
    for (const chunk of chunks) bytes += chunk.byteLength;
    checkChunk(this.done, this.digest, this.written, { byteLength: bytes });
    for (const chunk of chunks) this.hasher.update(chunk);
    // Positioned writes may overlap: the next chunks are received and hashed while
    // earlier ones reach the file. The caller must not reuse the chunks' memory.
    const write = { end: this.written + bytes, done: false };
    this.unfinished.push(write);
    const pending = this.writeAt(chunks, this.written).then(() => {
      write.done = true;
      this.reportWritten();
    });
    pending.catch(() => {}); // awaited later (here or in settle); this only marks it handled meanwhile
    this.inFlight.push(pending);
    this.written += bytes;
    this.unflushed += bytes;
    if (this.durable && this.unflushed >= EARLY_FLUSH_BYTES && !this.earlyFlush) {
      // Only a head start for the disk: the flush at commit is the one that counts, so failures are ignored here.
      this.unflushed = 0;
      this.earlyFlush = this.handle
        .datasync()
        .catch(() => {})
        .finally(() => {
          this.earlyFlush = undefined;
        });
    }
    if (this.inFlight.length >= MAX_WRITES_IN_FLIGHT) await this.inFlight.shift();
  }

  /** Tells the hash how far the file is written without a gap (every few megabytes: each is a message). */
  private reportWritten(): void {
    let upTo: number | undefined;
    while (this.unfinished[0]?.done) upTo = (this.unfinished.shift() as { end: number }).end;
    if (upTo !== undefined && upTo - this.reported >= HASH_ADVANCE_BYTES) {
      this.reported = upTo;
      this.hasher.written(upTo);
    }
  }

  /** Chunks, one after the other; a full disk gets room made (the rest of the blob's worth) and one more try. */
  private async writeAt(chunks: readonly Uint8Array[], position: number): Promise<void> {
    try {
      await writeFully(this.handle, chunks, position);
    } catch (err) {
      if (!isDiskFull(err)) throw err;
      // Writes in flight fail together: the first makes room for the rest of the blob, the others wait for it.
      this.roomMade ??= this.store.makeRoom(this.digest.sizeBytes - position);
      if ((await this.roomMade) === 0) throw this.store.diskFull(err, this.digest);
      await writeFully(this.handle, chunks, position).catch((again: unknown) => {
        throw isDiskFull(again) ? this.store.diskFull(again, this.digest) : again;
      });
    }
  }

  async commit(): Promise<void> {
    if (this.done) throw new StatusError(Code.FAILED_PRECONDITION, "the upload already finished");
    this.done = true;
    const { durable } = this;
    try {
      await this.settle(durable);
    } catch (err) {
      // The hash thread holds the file open too: dropped, so that a full disk gets its blocks back.
      this.hasher.drop();
      await unlink(this.temp).catch(() => {});
      throw isDiskFull(err) ? this.store.diskFull(err, this.digest) : err;
    }
    const { digest } = this;
    let wrong: StatusError | undefined;
    try {
      wrong = await uploadMismatch(digest, this.written, () => this.hasher.digestHex(this.written));
    } catch (err) {
      this.hasher.drop();
      await unlink(this.temp).catch(() => {});
      throw err;
    }
    if (wrong) {
      this.hasher.drop();
      await unlink(this.temp).catch(() => {});
      throw wrong;
    }
    // An unchecked file of the same name (found at start) is replaced by this checked one.
    const key = digestKey(digest);
    if (this.files.has(key) && !this.files.isVerified(key)) await this.files.remove(key);
    try {
      await this.files.commit(this.temp, key, digest.sizeBytes, { durable });
    } catch (err) {
      // A new prefix directory may need a block of its own.
      await unlink(this.temp).catch(() => {});
      throw isDiskFull(err) ? this.store.diskFull(err, digest) : err;
    }
  }

  /**
   * Waits for every write, flushes the file to disk when `durable`, then
   * closes it; the first error is thrown.
   */
  private async settle(durable = false): Promise<void> {
    const results = await Promise.allSettled(this.inFlight.splice(0));
    await this.earlyFlush;
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    try {
      if (!failed && durable) await this.handle.sync();
    } finally {
      await this.handle.close();
    }
    if (failed) throw failed.reason;
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.settle().catch(() => {});
    this.hasher.drop();
    await unlink(this.temp).catch(() => {});
  }
}

/** The thread hashing an upload is told of its progress this often. */
const HASH_ADVANCE_BYTES = 4 * 1024 * 1024;

/** Uploads of this size and more are hashed on a thread, from their files (see HashThread.followFile). */
const THREAD_HASH_BYTES = 4 * 1024 * 1024;

/** An upload's hash, fed as the upload goes: by its chunks, or by how far its file is written. */
interface UploadHash {
  update(chunk: Uint8Array): void;
  written(upTo: number): void;
  digestHex(size: number): string | Promise<string>;
  drop(): void;
}

/** Hashes the chunks as they pass, on the event loop. */
function passingHash(hasher: Hasher): UploadHash {
  return {
    update: (chunk) => hasher.update(chunk),
    written: () => {},
    digestHex: () => hasher.digestHex(),
    drop: () => {},
  };
}

/** Leaves the chunks alone; the thread reads them back from the file as they are written. */
function followedHash(followed: FollowedFileHash): UploadHash {
  return {
    update: () => {},
    written: (upTo) => followed.advance(upTo),
    digestHex: (size) => followed.digestHex(size),
    drop: () => followed.drop(),
  };
}

/** Refuses a chunk after the upload finished, or one that would pass the blob's size. */
function checkChunk(done: boolean, digest: Digest, written: number, chunk: { byteLength: number }): void {
  if (done) throw new StatusError(Code.FAILED_PRECONDITION, "write after the upload finished");
  if (written + chunk.byteLength > digest.sizeBytes) {
    throw new StatusError(
      Code.INVALID_ARGUMENT,
      `more than ${digest.sizeBytes} bytes were sent for blob ${formatDigest(digest)}`,
    );
  }
}

/** Why a finished upload is not the blob its digest names, or undefined when it is. */
async function uploadMismatch(
  digest: Digest,
  written: number,
  hash: () => string | Promise<string>,
): Promise<StatusError | undefined> {
  if (written !== digest.sizeBytes) {
    return new StatusError(
      Code.INVALID_ARGUMENT,
      `the upload ended after ${written} bytes; blob ${formatDigest(digest)} has ${digest.sizeBytes}`,
    );
  }
  const actual = await hash();
  if (actual === digest.hash) return undefined;
  return new StatusError(
    Code.INVALID_ARGUMENT,
    `the uploaded data's ${digest.fn.name} is ${actual}, not ${digest.hash} as the resource name says`,
  );
}

/** A small upload, gathered in memory and stored with `put` (to the log) when complete. */
class MemoryBlobWriter implements BlobWriter {
  written = 0;
  private readonly chunks: Uint8Array[] = [];
  private done = false;

  constructor(
    readonly digest: Digest,
    private readonly store: DiskBlobStore,
    private readonly durable: boolean,
  ) {}

  async write(chunk: Uint8Array): Promise<void> {
    checkChunk(this.done, this.digest, this.written, chunk);
    this.chunks.push(chunk);
    this.written += chunk.byteLength;
  }

  async writeAll(chunks: readonly Uint8Array[]): Promise<void> {
    for (const chunk of chunks) await this.write(chunk);
  }

  async commit(): Promise<void> {
    if (this.done) throw new StatusError(Code.FAILED_PRECONDITION, "the upload already finished");
    this.done = true;
    const { digest } = this;
    const data = Buffer.concat(this.chunks);
    const actual = (await digestOf(digest.fn, data)).hash;
    const wrong = await uploadMismatch(digest, this.written, () => actual);
    if (wrong) throw wrong;
    await this.store.put(digest, data, { hashedByCaller: true, durable: this.durable });
  }

  async abort(): Promise<void> {
    this.done = true;
    this.chunks.length = 0;
  }
}
