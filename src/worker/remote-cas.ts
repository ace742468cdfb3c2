import { randomUUID } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, readFile, rename, unlink } from "node:fs/promises";
import { Readable } from "node:stream";
import type { ServiceError } from "@grpc/grpc-js";
import { type ClientChannel, clientChannel } from "../auth/client-channel.js";
import { type Digest, formatDigest } from "../digest/digest.js";
import { formatReadResourceName, formatWriteResourceName } from "../digest/resource-name.js";
import {
  Compressor_Value,
  ContentAddressableStorageClient,
  type Directory,
  type GetTreeResponse,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { ByteStreamClient } from "../gen/google/bytestream/bytestream.js";
import type { LocalBlob } from "../merkle/local-tree.js";
import { Code, StatusError } from "../status/status.js";

/** Blobs up to this size travel in batches; larger ones through ByteStream. */
const BATCH_BLOB_LIMIT = 1024 * 1024;
const BATCH_TOTAL_LIMIT = 3 * 1024 * 1024;
const CHUNK_BYTES = 1024 * 1024;
/** Outputs up to this size are uploaded without asking FindMissingBlobs first. */
const SEND_WITHOUT_ASKING_LIMIT = 16 * 1024;

export const CHANNEL_OPTIONS = {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
  "grpc-node.flow_control_window": 16 * 1024 * 1024,
};

/** A file to upload, or bytes already in memory. */
export type UploadSource = LocalBlob;

/**
 * The worker's view of the farm's CAS, over REAPI like any client: workers
 * on other hosts and the local ones use the same code.
 */
export class RemoteCas {
  private constructor(
    private readonly cas: ContentAddressableStorageClient,
    private readonly byteStream: ByteStreamClient,
    private readonly instanceName: string,
  ) {}

  /** A plain address, or a channel (TLS, token) from clientChannel(). */
  static connect(to: string | ClientChannel): RemoteCas {
    const { target, credentials, options } =
      typeof to === "string" ? clientChannel({ address: to }, CHANNEL_OPTIONS) : to;
    return new RemoteCas(
      new ContentAddressableStorageClient(target, credentials, options),
      new ByteStreamClient(target, credentials, options),
      "",
    );
  }

  /** The same connection, addressing another instance name. */
  withInstance(instanceName: string): RemoteCas {
    return new RemoteCas(this.cas, this.byteStream, instanceName);
  }

  close(): void {
    this.cas.close();
    this.byteStream.close();
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    if (digests.length === 0) return [];
    const byKey = new Map(digests.map((d) => [`${d.hash}/${d.sizeBytes}`, d]));
    const response = await new Promise<{ missingBlobDigests: { hash: string; sizeBytes: number }[] }>(
      (resolve, reject) =>
        this.cas.findMissingBlobs(
          {
            instanceName: this.instanceName,
            blobDigests: [...byKey.values()].map(wire),
            digestFunction: (digests[0] as Digest).fn.wireValue,
          },
          (err, res) => (err ? reject(err) : resolve(res)),
        ),
    );
    return response.missingBlobDigests.map((d) => byKey.get(`${d.hash}/${d.sizeBytes}`) as Digest);
  }

  /** Reads small blobs in batches; returns those found. */
  async readBlobs(digests: readonly Digest[]): Promise<Map<Digest, Buffer>> {
    const found = new Map<Digest, Buffer>();
    for (const batch of batches(digests, (d) => d.sizeBytes)) {
      const response = await new Promise<{
        responses: { digest?: { hash: string }; data: Buffer; status?: { code: number } }[];
      }>((resolve, reject) =>
        this.cas.batchReadBlobs(
          {
            instanceName: this.instanceName,
            digests: batch.map(wire),
            acceptableCompressors: [],
            digestFunction: (batch[0] as Digest).fn.wireValue,
          },
          (err, res) => (err ? reject(err) : resolve(res)),
        ),
      );
      response.responses.forEach((r, i) => {
        if (r.status?.code === Code.OK) found.set(batch[i] as Digest, r.data);
      });
    }
    return found;
  }

  /** Every Directory below `root` in one GetTree stream; empty when the root is not stored. */
  async getTree(root: Digest): Promise<Directory[]> {
    const directories: Directory[] = [];
    const stream = this.cas.getTree({
      instanceName: this.instanceName,
      rootDigest: wire(root),
      pageSize: 0,
      pageToken: "",
      digestFunction: root.fn.wireValue,
    });
    try {
      for await (const page of stream) directories.push(...(page as GetTreeResponse).directories);
    } catch (err) {
      if ((err as ServiceError).code === Code.NOT_FOUND) return [];
      throw err;
    }
    return directories;
  }

  /** Streams a blob into `path` (written beside it, renamed when complete); false when it is not stored. */
  async readToFile(digest: Digest, path: string): Promise<boolean> {
    const temp = `${path}.${randomUUID()}.part`;
    const handle = await open(temp, "wx");
    const hasher = await digest.fn.createHasher();
    let position = 0;
    try {
      const stream = this.byteStream.read({
        resourceName: formatReadResourceName(this.instanceName, digest),
        readOffset: 0,
        readLimit: 0,
      });
      for await (const message of stream) {
        const data = (message as { data: Buffer }).data;
        hasher.update(data);
        await handle.write(data, 0, data.byteLength, position);
        position += data.byteLength;
      }
    } catch (err) {
      await handle.close();
      await unlink(temp).catch(() => {});
      if ((err as ServiceError).code === Code.NOT_FOUND) return false;
      throw err;
    }
    await handle.close();
    if (position !== digest.sizeBytes || hasher.digestHex() !== digest.hash) {
      await unlink(temp).catch(() => {});
      throw new StatusError(Code.DATA_LOSS, `blob ${formatDigest(digest)} arrived corrupted from the CAS`);
    }
    await rename(temp, path);
    return true;
  }

  /** Uploads what the CAS lacks: small blobs in batches, large ones through ByteStream. */
  async upload(sources: readonly UploadSource[]): Promise<void> {
    const unique = [...new Map(sources.map((s) => [`${s.digest.hash}/${s.digest.sizeBytes}`, s])).values()];
    // Asking whether a tiny blob is stored costs a round trip as dear as sending it.
    const tiny = unique.filter((s) => s.digest.sizeBytes <= SEND_WITHOUT_ASKING_LIMIT);
    const rest = unique.filter((s) => s.digest.sizeBytes > SEND_WITHOUT_ASKING_LIMIT);
    const missing = new Set(await this.findMissing(rest.map((s) => s.digest)));
    const wanted = [...tiny, ...rest.filter((s) => missing.has(s.digest))];
    const small = wanted.filter((s) => s.digest.sizeBytes <= BATCH_BLOB_LIMIT);
    const large = wanted.filter((s) => s.digest.sizeBytes > BATCH_BLOB_LIMIT);
    for (const batch of batches(small, (s) => s.digest.sizeBytes)) {
      const requests = await Promise.all(
        batch.map(async (s) => ({
          digest: wire(s.digest),
          data: "data" in s ? s.data : await readFile(s.path),
          compressor: Compressor_Value.IDENTITY,
        })),
      );
      const response = await new Promise<{ responses: { status?: { code: number; message: string } }[] }>(
        (resolve, reject) =>
          this.cas.batchUpdateBlobs(
            {
              instanceName: this.instanceName,
              requests,
              digestFunction: (batch[0] as UploadSource).digest.fn.wireValue,
            },
            (err, res) => (err ? reject(err) : resolve(res)),
          ),
      );
      const failed = response.responses.find((r) => r.status?.code !== Code.OK);
      if (failed) throw new StatusError(Code.INTERNAL, `uploading outputs failed: ${failed.status?.message}`);
    }
    for (const s of large) await this.writeStream(s);
  }

  private async writeStream(source: UploadSource): Promise<void> {
    const resourceName = formatWriteResourceName(this.instanceName, randomUUID(), source.digest);
    await new Promise<void>((resolve, reject) => {
      const call = this.byteStream.write((err) => (err ? reject(err) : resolve()));
      const chunks: AsyncIterable<Buffer> =
        "data" in source ? Readable.from([source.data]) : createReadStream(source.path, { highWaterMark: CHUNK_BYTES });
      (async () => {
        let offset = 0;
        for await (const chunk of chunks) {
          for (let at = 0; at < chunk.byteLength; at += CHUNK_BYTES) {
            const data = chunk.subarray(at, at + CHUNK_BYTES);
            const last = offset + data.byteLength === source.digest.sizeBytes;
            if (
              !call.write({
                resourceName: offset === 0 ? resourceName : "",
                writeOffset: offset,
                finishWrite: last,
                data,
              })
            ) {
              await new Promise((r) => call.once("drain", r));
            }
            offset += data.byteLength;
          }
        }
        call.end();
      })().catch((err: unknown) => {
        call.cancel();
        reject(err);
      });
    });
  }
}

function wire(d: Digest): { hash: string; sizeBytes: number } {
  return { hash: d.hash, sizeBytes: d.sizeBytes };
}

function* batches<T>(items: readonly T[], size: (item: T) => number): Generator<T[]> {
  let batch: T[] = [];
  let total = 0;
  for (const item of items) {
    if (batch.length > 0 && total + size(item) > BATCH_TOTAL_LIMIT) {
      yield batch;
      batch = [];
      total = 0;
    }
    batch.push(item);
    total += size(item);
  }
  if (batch.length > 0) yield batch;
}
