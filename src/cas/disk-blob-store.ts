import { type FileHandle, open, unlink } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { type Digest, digestKey, digestOf, formatDigest, verifyBlob } from "../digest/digest.js";
import type { Hasher } from "../digest/functions.js";
import { Code, StatusError } from "../status/status.js";
import { LruDirectory } from "../store/lru-directory.js";
import { SegmentLog } from "../store/segment-log.js";
import type { BlobStore, BlobWriter, PutOptions } from "./blob-store.js";
import { isEmptyBlob } from "./empty-blob.js";

/** Read chunk size: large enough for throughput, well under gRPC's 4 MiB message limit. */
const READ_CHUNK_BYTES = 1024 * 1024;

/** Enough overlap to keep the disk busy while the next chunks arrive, bounded in memory. */
const MAX_WRITES_IN_FLIGHT = 4;

async function writeFully(handle: FileHandle, chunk: Uint8Array, position: number): Promise<void> {
  let offset = 0;
  while (offset < chunk.byteLength) {
    const { bytesWritten } = await handle.write(chunk, offset, chunk.byteLength - offset, position + offset);
    offset += bytesWritten;
  }
}

/** Blobs up to this size go to the segment log; larger ones get a file each. */
export const LOGGED_BLOB_BYTES = 64 * 1024;

export interface DiskBlobStoreOptions {
  /** Blob files and the log together stay within this. */
  maxBytes: number;
  /** Called for each blob evicted. */
  onEvict?: (key: string, size: number) => void;
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
 */
export class DiskBlobStore implements BlobStore {
  /** `logLimit`: blobs up to this size go to the log (0: none do). */
  constructor(
    private readonly files: LruDirectory,
    private readonly log: SegmentLog,
    private readonly logLimit: number,
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
    const files = await LruDirectory.open(dir, { maxBytes: options.maxBytes - logBytes, onEvict: options.onEvict });
    const log = await SegmentLog.open(join(dir, "log"), { maxBytes: logBytes, segmentBytes, onEvict: options.onEvict });
    return new DiskBlobStore(files, log, logged ? LOGGED_BLOB_BYTES : 0);
  }

  /** Blobs stored, and their bytes. */
  get usage(): { count: number; bytes: number } {
    return { count: this.files.count + this.log.count, bytes: this.files.usedBytes + this.log.usedBytes };
  }

  /** Closes the log's files; the store is not used afterwards. */
  close(): void {
    this.log.close();
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    const missing: Digest[] = [];
    for (const digest of digests) {
      if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) continue;
      const key = digestKey(digest);
      if (!this.log.touch(key) && !this.files.touch(key)) missing.push(digest);
    }
    return missing;
  }

  async get(digest: Digest): Promise<Buffer | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Buffer.alloc(0);
    const logged = await this.fromLog(digest);
    return logged ?? this.files.readFile(digestKey(digest));
  }

  async openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Readable.from([]);
    const end = limit === 0 ? digest.sizeBytes : Math.min(digest.sizeBytes, offset + limit);
    const logged = await this.fromLog(digest);
    if (logged) return Readable.from([logged.subarray(Math.min(offset, end), end)]);
    return this.files.openRead(digestKey(digest), offset, end, READ_CHUNK_BYTES);
  }

  async put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void> {
    if (!options?.hashedByCaller) await verifyBlob(digest, data, "data");
    if (digest.sizeBytes === 0) return;
    const key = digestKey(digest);
    if (this.log.touch(key) || this.files.touch(key)) return;
    if (data.byteLength <= this.logLimit) this.log.put(key, data);
    else await this.files.writeFile(key, data);
  }

  /** Forgets a blob, as if evicted (for repairs and tests). */
  async remove(digest: Digest): Promise<void> {
    const key = digestKey(digest);
    this.log.remove(key);
    await this.files.remove(key);
  }

  /**
   * A logged blob, checked against its digest: a segment written before a
   * crash may hold bytes that never reached the disk. A blob that fails is
   * forgotten, as if it had been evicted.
   */
  private async fromLog(digest: Digest): Promise<Buffer | undefined> {
    const key = digestKey(digest);
    const data = this.log.get(key);
    if (!data) return undefined;
    try {
      await verifyBlob(digest, data, "stored blob");
      return data;
    } catch {
      this.log.remove(key);
      return undefined;
    }
  }

  async createWriter(digest: Digest): Promise<BlobWriter> {
    if (digest.sizeBytes <= this.logLimit) return new MemoryBlobWriter(digest, this);
    const temp = this.files.tempPath();
    const handle = await open(temp, "wx");
    return new DiskBlobWriter(digest, temp, handle, await digest.fn.createHasher(), this.files);
  }
}

class DiskBlobWriter implements BlobWriter {
  written = 0;
  private done = false;
  private readonly inFlight: Promise<void>[] = [];

  constructor(
    readonly digest: Digest,
    private readonly temp: string,
    private readonly handle: FileHandle,
    private readonly hasher: Hasher,
    private readonly files: LruDirectory,
  ) {}

  async write(chunk: Uint8Array): Promise<void> {
    checkChunk(this.done, this.digest, this.written, chunk);
    this.hasher.update(chunk);
    // Positioned writes may overlap: the next chunk is received and hashed while
    // earlier ones reach the file. The caller must not reuse `chunk`'s memory.
    const pending = writeFully(this.handle, chunk, this.written);
    pending.catch(() => {}); // awaited later (here or in settle); this only marks it handled meanwhile
    this.inFlight.push(pending);
    this.written += chunk.byteLength;
    if (this.inFlight.length >= MAX_WRITES_IN_FLIGHT) await this.inFlight.shift();
  }

  async commit(): Promise<void> {
    if (this.done) throw new StatusError(Code.FAILED_PRECONDITION, "the upload already finished");
    this.done = true;
    await this.settle();
    const { digest } = this;
    const wrong = uploadMismatch(digest, this.written, () => this.hasher.digestHex());
    if (wrong) {
      await unlink(this.temp).catch(() => {});
      throw wrong;
    }
    await this.files.commit(this.temp, digestKey(digest), digest.sizeBytes);
  }

  /** Waits for every write, then closes the file; the first write error is thrown. */
  private async settle(): Promise<void> {
    const results = await Promise.allSettled(this.inFlight.splice(0));
    await this.handle.close();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.settle().catch(() => {});
    await unlink(this.temp).catch(() => {});
  }
}

/** Refuses a chunk after the upload finished, or one that would pass the blob's size. */
function checkChunk(done: boolean, digest: Digest, written: number, chunk: Uint8Array): void {
  if (done) throw new StatusError(Code.FAILED_PRECONDITION, "write after the upload finished");
  if (written + chunk.byteLength > digest.sizeBytes) {
    throw new StatusError(
      Code.INVALID_ARGUMENT,
      `more than ${digest.sizeBytes} bytes were sent for blob ${formatDigest(digest)}`,
    );
  }
}

/** Why a finished upload is not the blob its digest names, or undefined when it is. */
function uploadMismatch(digest: Digest, written: number, hash: () => string): StatusError | undefined {
  if (written !== digest.sizeBytes) {
    return new StatusError(
      Code.INVALID_ARGUMENT,
      `the upload ended after ${written} bytes; blob ${formatDigest(digest)} has ${digest.sizeBytes}`,
    );
  }
  const actual = hash();
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
  ) {}

  async write(chunk: Uint8Array): Promise<void> {
    checkChunk(this.done, this.digest, this.written, chunk);
    this.chunks.push(chunk);
    this.written += chunk.byteLength;
  }

  async commit(): Promise<void> {
    if (this.done) throw new StatusError(Code.FAILED_PRECONDITION, "the upload already finished");
    this.done = true;
    const { digest } = this;
    const data = Buffer.concat(this.chunks);
    const actual = (await digestOf(digest.fn, data)).hash;
    const wrong = uploadMismatch(digest, this.written, () => actual);
    if (wrong) throw wrong;
    await this.store.put(digest, data, { hashedByCaller: true });
  }

  async abort(): Promise<void> {
    this.done = true;
    this.chunks.length = 0;
  }
}
