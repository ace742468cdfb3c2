import { type FileHandle, open, unlink } from "node:fs/promises";
import { Readable } from "node:stream";
import { type Digest, digestKey, formatDigest, verifyBlob } from "../digest/digest.js";
import type { Hasher } from "../digest/functions.js";
import { Code, StatusError } from "../status/status.js";
import type { LruDirectory } from "../store/lru-directory.js";
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

/** The embedded CAS: blobs as files in an LRU-capped directory. */
export class DiskBlobStore implements BlobStore {
  constructor(private readonly files: LruDirectory) {}

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    const missing: Digest[] = [];
    for (const digest of digests) {
      if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) continue;
      if (!this.files.touch(digestKey(digest))) missing.push(digest);
    }
    return missing;
  }

  async get(digest: Digest): Promise<Buffer | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Buffer.alloc(0);
    return this.files.readFile(digestKey(digest));
  }

  async openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined> {
    if (digest.sizeBytes === 0 && (await isEmptyBlob(digest))) return Readable.from([]);
    const end = limit === 0 ? digest.sizeBytes : Math.min(digest.sizeBytes, offset + limit);
    return this.files.openRead(digestKey(digest), offset, end, READ_CHUNK_BYTES);
  }

  async put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void> {
    if (!options?.hashedByCaller) await verifyBlob(digest, data, "data");
    if (digest.sizeBytes === 0) return;
    const key = digestKey(digest);
    if (this.files.touch(key)) return;
    await this.files.writeFile(key, data);
  }

  async createWriter(digest: Digest): Promise<BlobWriter> {
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
    if (this.done) throw new StatusError(Code.FAILED_PRECONDITION, "write after the upload finished");
    if (this.written + chunk.byteLength > this.digest.sizeBytes) {
      throw new StatusError(
        Code.INVALID_ARGUMENT,
        `more than ${this.digest.sizeBytes} bytes were sent for blob ${formatDigest(this.digest)}`,
      );
    }
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
    if (this.written !== digest.sizeBytes) {
      await unlink(this.temp).catch(() => {});
      throw new StatusError(
        Code.INVALID_ARGUMENT,
        `the upload ended after ${this.written} bytes; blob ${formatDigest(digest)} has ${digest.sizeBytes}`,
      );
    }
    const actual = this.hasher.digestHex();
    if (actual !== digest.hash) {
      await unlink(this.temp).catch(() => {});
      throw new StatusError(
        Code.INVALID_ARGUMENT,
        `the uploaded data's ${digest.fn.name} is ${actual}, not ${digest.hash} as the resource name says`,
      );
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
