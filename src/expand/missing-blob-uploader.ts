import { createReadStream } from "node:fs";
import { unlink } from "node:fs/promises";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestKey } from "../digest/digest.js";

/** A blob to store: bytes in memory, or a temporary file the uploader deletes once done with it. */
export type PendingBlob = { digest: Digest; data: Uint8Array } | { digest: Digest; path: string };

export interface UploaderOptions {
  /** A batch is sent once it holds this many bytes (in memory or in temporary files)… */
  batchBytes?: number;
  /** …or this many blobs. */
  batchBlobs?: number;
  /** Puts in flight at once. */
  concurrency?: number;
}

const STREAM_CHUNK = 1024 * 1024;

/**
 * Stores blobs the CAS lacks, asking about them in batches so that a tree
 * the CAS already holds costs one findMissing per batch and no write. One
 * batch is sent while the next fills; a caller adding to a full batch waits
 * for the one in flight, so memory stays within about two batches.
 */
export class MissingBlobUploader {
  private batch: PendingBlob[] = [];
  /** What the batch holds on to: temporary files' sizes, and whole buffers for blobs that are views of one. */
  private batchBytes = 0;
  private readonly batchBuffers = new Set<ArrayBufferLike>();
  private inFlight: Promise<void> | undefined;
  private readonly seen = new Set<string>();
  private readonly maxBatchBytes: number;
  private readonly maxBatchBlobs: number;
  private readonly concurrency: number;

  constructor(
    private readonly cas: BlobStore,
    options: UploaderOptions = {},
  ) {
    this.maxBatchBytes = options.batchBytes ?? 32 * 1024 * 1024;
    this.maxBatchBlobs = options.batchBlobs ?? 2000;
    this.concurrency = options.concurrency ?? 16;
  }

  /** Queues `blob` unless the same digest was queued before (a duplicate's temporary file is deleted at once). */
  async add(blob: PendingBlob): Promise<void> {
    const key = digestKey(blob.digest);
    if (this.seen.has(key)) {
      if ("path" in blob) await unlink(blob.path);
      return;
    }
    this.seen.add(key);
    this.batch.push(blob);
    if ("path" in blob) {
      this.batchBytes += blob.digest.sizeBytes;
    } else if (!this.batchBuffers.has(blob.data.buffer)) {
      this.batchBuffers.add(blob.data.buffer);
      this.batchBytes += blob.data.buffer.byteLength;
    }
    if (this.batchBytes >= this.maxBatchBytes || this.batch.length >= this.maxBatchBlobs) await this.send();
  }

  /** Sends what is queued and waits until every blob is stored. */
  async finish(): Promise<void> {
    await this.send();
    await this.inFlight;
  }

  /** Waits for the batch in flight, ignoring its outcome, so the caller can clean up after a failure. */
  async abort(): Promise<void> {
    this.batch = [];
    this.batchBuffers.clear();
    await this.inFlight?.catch(() => {});
  }

  private async send(): Promise<void> {
    await this.inFlight;
    const batch = this.batch;
    this.batch = [];
    this.batchBytes = 0;
    this.batchBuffers.clear();
    if (batch.length === 0) {
      this.inFlight = undefined;
      return;
    }
    const sending = this.store(batch);
    sending.catch(() => {}); // rejections are seen by whoever awaits inFlight next
    this.inFlight = sending;
  }

  private async store(batch: PendingBlob[]): Promise<void> {
    const missing = new Set((await this.cas.findMissing(batch.map((b) => b.digest))).map(digestKey));
    let next = 0;
    let failed = false;
    const worker = async () => {
      while (next < batch.length && !failed) {
        const blob = batch[next++] as PendingBlob;
        const needed = missing.has(digestKey(blob.digest));
        if ("data" in blob) {
          // The converter hashed these bytes to name them; an image's files would only crowd a memory cache.
          if (needed) await this.cas.put(blob.digest, blob.data, { hashedByCaller: true, bulk: true });
        } else {
          try {
            if (needed) await this.storeFile(blob.digest, blob.path);
          } finally {
            await unlink(blob.path).catch(() => {});
          }
        }
      }
    };
    // Settled, not raced: the caller may delete the temporary files once this returns.
    const results = await Promise.allSettled(
      Array.from({ length: Math.min(this.concurrency, batch.length) }, () =>
        worker().catch((err: unknown) => {
          failed = true;
          throw err;
        }),
      ),
    );
    const failure = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failure) throw failure.reason;
  }

  private async storeFile(digest: Digest, path: string): Promise<void> {
    const writer = await this.cas.createWriter(digest);
    try {
      for await (const chunk of createReadStream(path, { highWaterMark: STREAM_CHUNK })) {
        await writer.write(chunk as Buffer);
      }
      await writer.commit();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  }
}
