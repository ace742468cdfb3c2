import { Readable } from "node:stream";
import { type Digest, digestKey } from "../digest/digest.js";
import type { BlobStore, BlobWriter, PutOptions } from "./blob-store.js";

export interface MemoryCacheOptions {
  /** Blobs larger than this are never held in memory. */
  maxBlobBytes: number;
  /** Total bytes held; the least recently used blobs go first. */
  maxTotalBytes: number;
}

/**
 * Keeps the small blobs most recently stored or read in memory, in front of
 * another store. Every action makes the server read its Action and Command
 * and the worker ask for its Directory messages, all blobs the client has
 * just uploaded; from disk each read costs several thread-pool round trips.
 * The inner store stays the authority: a blob it no longer has (evicted) is
 * dropped here too, so both always agree on what is stored.
 */
export class MemoryCachedBlobStore implements BlobStore {
  /** Insertion order is recency order: a hit is deleted and set again. */
  readonly #blobs = new Map<string, Buffer>();
  #totalBytes = 0;

  constructor(
    private readonly inner: BlobStore,
    private readonly options: MemoryCacheOptions,
  ) {}

  findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    return this.inner.findMissing(digests);
  }

  async get(digest: Digest): Promise<Buffer | undefined> {
    const cached = await this.#lookup(digest);
    if (cached) return cached;
    const data = await this.inner.get(digest);
    if (data) this.#remember(digestKey(digest), data);
    return data;
  }

  async openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined> {
    const cached = await this.#lookup(digest);
    if (!cached) return this.inner.openRead(digest, offset, limit);
    const end = limit === 0 ? cached.length : Math.min(cached.length, offset + limit);
    return Readable.from([cached.subarray(Math.min(offset, cached.length), end)]);
  }

  async put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void> {
    await this.inner.put(digest, data, options);
    // A copy: `data` may be a view into a larger buffer (a whole gRPC message) that must not be kept alive.
    if (data.byteLength <= this.options.maxBlobBytes && !options?.bulk)
      this.#remember(digestKey(digest), Buffer.from(data));
  }

  createWriter(digest: Digest, options?: { durable?: boolean }): Promise<BlobWriter> {
    return this.inner.createWriter(digest, options);
  }

  adoptFile(digest: Digest, path: string, options?: { durable?: boolean }): Promise<void> {
    return this.inner.adoptFile(digest, path, options);
  }

  async #lookup(digest: Digest): Promise<Buffer | undefined> {
    const key = digestKey(digest);
    const cached = this.#blobs.get(key);
    if (!cached) return undefined;
    // Also marks the blob as used in the inner store, whose eviction order must see this read.
    const gone = (await this.inner.findMissing([digest])).length > 0;
    this.#forget(key);
    if (gone) return undefined;
    this.#blobs.set(key, cached);
    this.#totalBytes += cached.length;
    return cached;
  }

  #remember(key: string, data: Buffer): void {
    if (data.length > this.options.maxBlobBytes || data.length === 0) return;
    this.#forget(key);
    this.#blobs.set(key, data);
    this.#totalBytes += data.length;
    for (const [oldest, blob] of this.#blobs) {
      if (this.#totalBytes <= this.options.maxTotalBytes) break;
      this.#blobs.delete(oldest);
      this.#totalBytes -= blob.length;
    }
  }

  #forget(key: string): void {
    const blob = this.#blobs.get(key);
    if (!blob) return;
    this.#blobs.delete(key);
    this.#totalBytes -= blob.length;
  }
}
