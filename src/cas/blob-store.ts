import type { Readable } from "node:stream";
import type { Digest } from "../digest/digest.js";

/**
 * The content-addressable storage as the rest of Berth sees it. Every blob
 * handed out has been verified against its digest; implementations never
 * serve a partial or unverified blob.
 */
export interface BlobStore {
  /** The digests among `digests` that are not stored; the others count as used now. */
  findMissing(digests: readonly Digest[]): Promise<Digest[]>;
  /** The whole blob, or undefined when it is not stored. */
  get(digest: Digest): Promise<Buffer | undefined>;
  /** Bytes [offset, offset+limit) of the blob (limit 0: to the end), or undefined when not stored. */
  openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined>;
  /** Stores a blob held in memory; INVALID_ARGUMENT when it does not match its digest. */
  put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void>;
  /** Starts a streamed upload of one blob. */
  /** `durable: false`: see PutOptions.durable (the writer then never waits for, or starts, a flush). */
  createWriter(digest: Digest, options?: { durable?: boolean }): Promise<BlobWriter>;
  /**
   * Takes in, as the blob `digest`, a complete file at `path` on the data
   * directory's file system that nothing writes any more and whose bytes the
   * caller hashed in this process (a download; see PutOptions.hashedByCaller
   * and PutOptions.durable). The file is moved, not copied; it is gone
   * afterwards either way. INVALID_ARGUMENT when its size is not the digest's.
   */
  adoptFile(digest: Digest, path: string, options?: { durable?: boolean }): Promise<void>;
}

/** How a blob reaches `put`, for callers inside Berth that know more than a client would. */
export interface PutOptions {
  /** The caller computed the digest from these very bytes, in this process: they are not hashed a second time. */
  hashedByCaller?: boolean;
  /** One of many blobs imported at once (an image's files): not worth a place in a memory cache. */
  bulk?: boolean;
  /**
   * false: the put may return before the blob is flushed to disk (it is readable at once, and flushed in the
   * background). Only for blobs nobody was promised durability for: an action's outputs, named by an action
   * cache entry that is itself written behind (ac/write-behind-action-cache.ts); a crash loses both, and a
   * surviving entry whose blob is lost is a miss. Clients' uploads are always flushed first.
   */
  durable?: boolean;
}

/** A blob being uploaded in pieces; it becomes visible only after commit(). */
export interface BlobWriter {
  readonly digest: Digest;
  /** Bytes accepted so far. */
  readonly written: number;
  write(chunk: Uint8Array): Promise<void>;
  /** Several chunks in one write (a network body's, without copying them together); the caller keeps none. */
  writeAll(chunks: readonly Uint8Array[]): Promise<void>;
  /** Verifies size and hash, then publishes the blob atomically (flushed first, unless made not durable). */
  commit(): Promise<void>;
  /** Drops what was written. */
  abort(): Promise<void>;
}
