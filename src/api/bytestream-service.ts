import { once } from "node:events";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ServerReadableStream, ServerWritableStream } from "@grpc/grpc-js";
import type { BlobStore, BlobWriter } from "../cas/blob-store.js";
import type { UploadSessions } from "../cas/upload-sessions.js";
import { zstdCompressStream, zstdDecompressStream } from "../cas/zstd.js";
import { digestKey } from "../digest/digest.js";
import { type BlobResource, parseReadResourceName, parseWriteResourceName } from "../digest/resource-name.js";
import type {
  ByteStreamServer,
  ReadRequest,
  ReadResponse,
  WriteRequest,
  WriteResponse,
} from "../gen/google/bytestream/bytestream.js";
import type { Logger } from "../log/log.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure, unary } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

type WriteStream = ServerReadableStream<WriteRequest, WriteResponse>;

export function byteStreamService(
  cas: BlobStore,
  uploads: UploadSessions,
  instances: InstanceNames,
  log: Logger,
): ByteStreamServer {
  const isStored = async (resource: BlobResource) => (await cas.findMissing([resource.digest])).length === 0;

  async function read(call: ServerWritableStream<ReadRequest, ReadResponse>): Promise<void> {
    const { resourceName, readOffset, readLimit } = call.request;
    const resource = parseReadResourceName(resourceName);
    instances.check(resource.instanceName, "resource_name");
    const { digest } = resource;
    if (readOffset < 0) throw invalidArgument("read_offset", `${readOffset} is negative`);
    if (readLimit < 0) throw invalidArgument("read_limit", `${readLimit} is negative`);
    if (readOffset > digest.sizeBytes) {
      throw new StatusError(
        Code.OUT_OF_RANGE,
        `read_offset ${readOffset} is past the end of a blob of ${digest.sizeBytes} bytes`,
      );
    }
    if (resource.compression !== "identity" && readLimit !== 0) {
      throw invalidArgument("read_limit", "must be 0 when reading compressed-blobs");
    }
    const file = await cas.openRead(digest, readOffset, readLimit);
    if (!file) throw new StatusError(Code.NOT_FOUND, `blob ${digest.hash}/${digest.sizeBytes} is not in the CAS`);
    const source = resource.compression === "zstd" ? file.pipe(zstdCompressStream()) : file;
    file.on("error", (err) => source.destroy(err));
    try {
      for await (const chunk of source) {
        if (call.cancelled) break;
        if (!call.write({ data: chunk as Buffer })) await once(call, "drain");
      }
    } finally {
      file.destroy();
    }
    call.end();
  }

  async function write(call: WriteStream): Promise<WriteResponse> {
    const requests = call[Symbol.asyncIterator]() as AsyncIterator<WriteRequest>;
    const first = await requests.next();
    if (first.done) throw invalidArgument("resource_name", "the Write stream carried no request");
    const resource = parseWriteResourceName(first.value.resourceName);
    instances.check(resource.instanceName, "resource_name");
    // A blob that is already stored needs no upload: answer at once, as the protocol allows.
    if (await isStored(resource)) {
      return { committedSize: resource.compression === "identity" ? resource.digest.sizeBytes : -1 };
    }
    // Most blobs of a build are small and arrive whole in one request: stored from memory, no upload session.
    const whole = first.value;
    if (
      resource.compression === "identity" &&
      whole.finishWrite &&
      whole.writeOffset === 0 &&
      whole.data.byteLength === resource.digest.sizeBytes &&
      uploads.committedBytes(uploadKey(resource)) === undefined
    ) {
      await cas.put(resource.digest, whole.data);
      return { committedSize: resource.digest.sizeBytes };
    }
    return resource.compression === "identity"
      ? writeResumable(resource, first.value, requests)
      : writeCompressed(resource, first.value, requests);
  }

  async function writeResumable(
    resource: BlobResource,
    first: WriteRequest,
    requests: AsyncIterator<WriteRequest>,
  ): Promise<WriteResponse> {
    const key = uploadKey(resource);
    const session = await uploads.attach(key, resource.digest, first.writeOffset);
    const { writer } = session;
    let request = first;
    for (;;) {
      try {
        checkRequest(request, first.resourceName, writer.written);
        if (request.data.byteLength > 0) await writer.write(request.data);
        if (request.finishWrite) {
          await writer.commit();
          uploads.forget(key);
          return { committedSize: writer.written };
        }
      } catch (err) {
        // Bad data ends the upload; a bad offset leaves it for QueryWriteStatus and a retry.
        if (isOffsetError(err)) uploads.detach(key, session);
        else await uploads.drop(key);
        throw err;
      }
      let next: IteratorResult<WriteRequest>;
      try {
        next = await requests.next();
      } catch (err) {
        uploads.detach(key, session);
        throw err;
      }
      if (next.done) {
        uploads.detach(key, session);
        throw invalidArgument("finish_write", `the stream ended after ${writer.written} bytes without finish_write`);
      }
      request = next.value;
    }
  }

  async function writeCompressed(
    resource: BlobResource,
    first: WriteRequest,
    requests: AsyncIterator<WriteRequest>,
  ): Promise<WriteResponse> {
    if (first.writeOffset !== 0) {
      throw invalidArgument("write_offset", "compressed uploads cannot be resumed; start again at offset 0");
    }
    let compressedBytes = 0;
    let finished = false;
    async function* compressedChunks(): AsyncGenerator<Buffer> {
      let request = first;
      for (;;) {
        checkRequest(request, first.resourceName, compressedBytes);
        compressedBytes += request.data.byteLength;
        if (request.data.byteLength > 0) yield request.data;
        if (request.finishWrite) {
          finished = true;
          return;
        }
        const next = await requests.next();
        if (next.done) return;
        request = next.value;
      }
    }
    const writer: BlobWriter = await cas.createWriter(resource.digest);
    try {
      await pipeline(
        Readable.from(compressedChunks()),
        zstdDecompressStream(),
        async (chunks: AsyncIterable<Buffer>) => {
          for await (const chunk of chunks) await writer.write(chunk);
        },
      );
      if (!finished) {
        throw invalidArgument(
          "finish_write",
          `the stream ended after ${compressedBytes} compressed bytes without finish_write`,
        );
      }
      await writer.commit();
    } catch (err) {
      await writer.abort();
      if (err instanceof StatusError) throw err;
      throw new StatusError(Code.INVALID_ARGUMENT, `data: not a valid zstd stream: ${(err as Error).message}`);
    }
    return { committedSize: compressedBytes };
  }

  return {
    read: (call) => {
      read(call).catch((err: unknown) => {
        logFailure(log, "ByteStream.Read", err);
        call.emit("error", toServiceError(err));
      });
    },

    write: (call, callback) => {
      write(call).then(
        (response) => callback(null, response),
        (err: unknown) => {
          logFailure(log, "ByteStream.Write", err);
          callback(toServiceError(err));
        },
      );
    },

    queryWriteStatus: unary(log, "ByteStream.QueryWriteStatus", async (request) => {
      const resource = parseWriteResourceName(request.resourceName);
      instances.check(resource.instanceName, "resource_name");
      if (await isStored(resource)) return { committedSize: resource.digest.sizeBytes, complete: true };
      const committed = resource.compression === "identity" ? uploads.committedBytes(uploadKey(resource)) : undefined;
      return { committedSize: committed ?? 0, complete: false };
    }),
  };
}

function uploadKey(resource: BlobResource): string {
  return `${resource.instanceName}\0${resource.uploadId ?? ""}\0${digestKey(resource.digest)}`;
}

class OffsetError extends StatusError {}

function isOffsetError(err: unknown): boolean {
  return err instanceof OffsetError;
}

function checkRequest(request: WriteRequest, resourceName: string, expectedOffset: number): void {
  if (request.resourceName !== "" && request.resourceName !== resourceName) {
    throw invalidArgument(
      "resource_name",
      `"${request.resourceName}" differs from the stream's first request ("${resourceName}")`,
    );
  }
  if (request.writeOffset !== expectedOffset) {
    throw new OffsetError(
      Code.INVALID_ARGUMENT,
      `write_offset: ${request.writeOffset} does not follow the ${expectedOffset} bytes committed so far`,
      { fieldViolations: [{ field: "write_offset", description: `expected ${expectedOffset}` }] },
    );
  }
}
