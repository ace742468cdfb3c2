import { join } from "node:path";
import type { Readable } from "node:stream";
import type { BlobStore, BlobWriter, PutOptions } from "../cas/blob-store.js";
import { DiskBlobStore } from "../cas/disk-blob-store.js";
import type { Digest } from "../digest/digest.js";

/** For tests: the real disk CAS in `dir`, and the store itself, to remove blobs from behind the counter's back. */
export async function openTestCas(dir: string): Promise<{ cas: CountingBlobStore; disk: DiskBlobStore }> {
  const disk = await DiskBlobStore.open(join(dir, "cas"), { maxBytes: 64 * 1024 ** 3 });
  return { cas: new CountingBlobStore(disk), disk };
}

/** A BlobStore that counts the writes reaching the store it wraps. */
export class CountingBlobStore implements BlobStore {
  puts = 0;
  writers = 0;

  constructor(private readonly inner: BlobStore) {}

  get writes(): number {
    return this.puts + this.writers;
  }

  findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    return this.inner.findMissing(digests);
  }

  get(digest: Digest): Promise<Buffer | undefined> {
    return this.inner.get(digest);
  }

  openRead(digest: Digest, offset: number, limit: number): Promise<Readable | undefined> {
    return this.inner.openRead(digest, offset, limit);
  }

  put(digest: Digest, data: Uint8Array, options?: PutOptions): Promise<void> {
    this.puts++;
    return this.inner.put(digest, data, options);
  }

  createWriter(digest: Digest): Promise<BlobWriter> {
    this.writers++;
    return this.inner.createWriter(digest);
  }

  adoptFile(digest: Digest, path: string, options?: { durable?: boolean }): Promise<void> {
    this.writers++;
    return this.inner.adoptFile(digest, path, options);
  }
}
