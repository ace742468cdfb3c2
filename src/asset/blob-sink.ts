import { randomBytes } from "node:crypto";
import { type FileHandle, open, unlink } from "node:fs/promises";
import { join } from "node:path";
import type { BlobStore, BlobWriter } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { DigestFunction, Hasher } from "../digest/functions.js";

/** Where a download's bytes go, a chunk at a time; the blob is in the CAS once finish() resolved. */
export interface BlobSink {
  /** The next chunks, in order, in one write; the sink keeps them (the caller does not reuse their memory). */
  write(chunks: readonly Buffer[]): Promise<void>;
  /** The blob's digest, stored. A CasSink's commit refuses bytes that are not the blob it expected. */
  finish(): Promise<Digest>;
  abort(): Promise<void>;
}

/** Straight into the CAS, for a download whose digest is known before its first byte (its checksum and length). */
export class CasSink implements BlobSink {
  private constructor(private readonly writer: BlobWriter) {}

  static async open(cas: BlobStore, expected: Digest): Promise<CasSink> {
    // A downloaded asset is a copy of what its URL serves, named by a write-behind association: flushed in the
    // background (see PutOptions.durable); a crash may lose both, and the next fetch downloads it again.
    return new CasSink(await cas.createWriter(expected, { durable: false }));
  }

  write(chunks: readonly Buffer[]): Promise<void> {
    return this.writer.writeAll(chunks);
  }

  async finish(): Promise<Digest> {
    await this.writer.commit();
    return this.writer.digest;
  }

  abort(): Promise<void> {
    return this.writer.abort();
  }
}

/** Bytes read at a time when a finished temporary file is copied into the CAS. */
const COPY_CHUNK_BYTES = 1024 * 1024;

/**
 * Into a file of the farm's temporary directory, hashed on the way, then
 * copied into the CAS under the digest found: for a download whose digest
 * is not known in advance. Memory holds one chunk at a time either way.
 */
export class TempFileSink implements BlobSink {
  private written = 0;

  private constructor(
    private readonly path: string,
    private readonly handle: FileHandle,
    private readonly hasher: Hasher,
    private readonly fn: DigestFunction,
    private readonly cas: BlobStore,
  ) {}

  static async open(cas: BlobStore, fn: DigestFunction, tempDir: string): Promise<TempFileSink> {
    const path = join(tempDir, `download-${randomBytes(8).toString("hex")}`);
    const handle = await open(path, "wx+", 0o600);
    return new TempFileSink(path, handle, await fn.createHasher(), fn, cas);
  }

  async write(chunks: readonly Buffer[]): Promise<void> {
    for (const chunk of chunks) {
      this.hasher.update(chunk);
      let offset = 0;
      while (offset < chunk.byteLength) {
        const { bytesWritten } = await this.handle.write(
          chunk,
          offset,
          chunk.byteLength - offset,
          this.written + offset,
        );
        offset += bytesWritten;
      }
      this.written += chunk.byteLength;
    }
  }

  async finish(): Promise<Digest> {
    const digest: Digest = { fn: this.fn, hash: this.hasher.digestHex(), sizeBytes: this.written };
    try {
      if ((await this.cas.findMissing([digest])).length > 0) await this.copyInto(digest);
      return digest;
    } finally {
      await this.abort();
    }
  }

  private async copyInto(digest: Digest): Promise<void> {
    const writer = await this.cas.createWriter(digest, { durable: false }); // see CasSink.open
    try {
      for (let position = 0; position < this.written; ) {
        // A fresh buffer per chunk: the writer may still be writing the previous one.
        const buffer = Buffer.allocUnsafe(Math.min(COPY_CHUNK_BYTES, this.written - position));
        const { bytesRead } = await this.handle.read(buffer, 0, buffer.byteLength, position);
        if (bytesRead === 0) break;
        await writer.writeAll([buffer.subarray(0, bytesRead)]);
        position += bytesRead;
      }
      await writer.commit();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await this.handle.close().catch(() => {});
    await unlink(this.path).catch(() => {});
  }
}
