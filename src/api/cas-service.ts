import type { ServerWritableStream } from "@grpc/grpc-js";
import type { BlobStore } from "../cas/blob-store.js";
import { readTreePage } from "../cas/directory-tree.js";
import { zstdCompress, zstdDecompressBounded } from "../cas/zstd.js";
import { type Digest, parseDigest, resolveDigestFunction } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  type BatchReadBlobsResponse_Response,
  type BatchUpdateBlobsResponse_Response,
  Compressor_Value,
  type ContentAddressableStorageServer,
  type GetTreeRequest,
  type GetTreeResponse,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Logger } from "../log/log.js";
import { OK_STATUS, toRpcStatus } from "../status/rpc-status.js";
import { Code, invalidArgument, StatusError, toStatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure, unary } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

export interface CasServiceOptions {
  maxBatchTotalSizeBytes: number;
  /** GetTree refuses, unread, a Directory larger than this (execution.inputLimits.maxDirectoryBytes). */
  maxDirectoryBytes: number;
}

const DEFAULT_TREE_PAGE_SIZE = 1000;
/** Keeps a GetTree page well under gRPC's default 4 MiB message limit. */
const MAX_TREE_PAGE_BYTES = 3 * 1024 * 1024;

export function casService(
  cas: BlobStore,
  instances: InstanceNames,
  options: CasServiceOptions,
  log: Logger,
): ContentAddressableStorageServer {
  const limit = options.maxBatchTotalSizeBytes;

  return {
    findMissingBlobs: unary(log, "FindMissingBlobs", async (request) => {
      instances.check(request.instanceName);
      const fn = resolveDigestFunction(request.digestFunction, request.blobDigests[0]?.hash);
      const digests = request.blobDigests.map((d, i) => parseDigest(fn, d, `blob_digests[${i}]`));
      const missing = await cas.findMissing(digests);
      return { missingBlobDigests: missing.map(toWire) };
    }),

    batchUpdateBlobs: unary(log, "BatchUpdateBlobs", async (request) => {
      instances.check(request.instanceName);
      const fn = resolveDigestFunction(request.digestFunction, request.requests[0]?.digest?.hash);
      const total = request.requests.reduce((sum, r) => sum + r.data.byteLength, 0);
      if (total > limit) throw overLimit("requests", total, limit);
      const responses = await Promise.all(
        request.requests.map(async (entry, i): Promise<BatchUpdateBlobsResponse_Response> => {
          const wireDigest = entry.digest ?? { hash: "", sizeBytes: 0 };
          try {
            const digest = parseDigest(fn, entry.digest, `requests[${i}].digest`);
            const data = await decodeUpload(entry.compressor, entry.data, digest, `requests[${i}].data`);
            await cas.put(digest, data);
            return { digest: wireDigest, status: OK_STATUS };
          } catch (err) {
            const error = toStatusError(err);
            if (error.code === Code.INTERNAL) logFailure(log, "BatchUpdateBlobs", err);
            return { digest: wireDigest, status: toRpcStatus(prefixed(error, `requests[${i}]`)) };
          }
        }),
      );
      return { responses };
    }),

    batchReadBlobs: unary(log, "BatchReadBlobs", async (request) => {
      instances.check(request.instanceName);
      const fn = resolveDigestFunction(request.digestFunction, request.digests[0]?.hash);
      const digests = request.digests.map((d, i) => parseDigest(fn, d, `digests[${i}]`));
      const total = digests.reduce((sum, d) => sum + d.sizeBytes, 0);
      if (total > limit) throw overLimit("digests", total, limit);
      const zstd = request.acceptableCompressors.includes(Compressor_Value.ZSTD);
      const responses = await Promise.all(
        digests.map(async (digest, i): Promise<BatchReadBlobsResponse_Response> => {
          const wire = request.digests[i] ?? toWire(digest);
          const data = await cas.get(digest);
          if (!data) {
            return {
              digest: wire,
              data: Buffer.alloc(0),
              compressor: Compressor_Value.IDENTITY,
              status: {
                code: Code.NOT_FOUND,
                message: `blob ${digest.hash}/${digest.sizeBytes} is not in the CAS`,
                details: [],
              },
            };
          }
          if (zstd && data.byteLength > 0) {
            const compressed = zstdCompress(data);
            if (compressed.byteLength < data.byteLength) {
              return { digest: wire, data: compressed, compressor: Compressor_Value.ZSTD, status: OK_STATUS };
            }
          }
          return { digest: wire, data, compressor: Compressor_Value.IDENTITY, status: OK_STATUS };
        }),
      );
      return { responses };
    }),

    getTree: (call: ServerWritableStream<GetTreeRequest, GetTreeResponse>) => {
      streamTree(call, cas, instances, options.maxDirectoryBytes).catch((err: unknown) => {
        logFailure(log, "GetTree", err);
        call.emit("error", toServiceError(err));
      });
    },

    splitBlob: unary(log, "SplitBlob", async () => {
      throw new StatusError(
        Code.UNIMPLEMENTED,
        "SplitBlob is not supported (capabilities: split_blob_support is false)",
      );
    }),

    spliceBlob: unary(log, "SpliceBlob", async () => {
      throw new StatusError(
        Code.UNIMPLEMENTED,
        "SpliceBlob is not supported (capabilities: splice_blob_support is false)",
      );
    }),
  };
}

async function streamTree(
  call: ServerWritableStream<GetTreeRequest, GetTreeResponse>,
  cas: BlobStore,
  instances: InstanceNames,
  maxDirectoryBytes: number,
): Promise<void> {
  const request = call.request;
  instances.check(request.instanceName);
  const fn: DigestFunction = resolveDigestFunction(request.digestFunction, request.rootDigest?.hash);
  const root = parseDigest(fn, request.rootDigest, "root_digest");
  if (request.pageSize < 0) throw invalidArgument("page_size", `${request.pageSize} is negative`);
  let offset = parsePageToken(request.pageToken);
  const pageSize = request.pageSize === 0 ? DEFAULT_TREE_PAGE_SIZE : Math.min(request.pageSize, DEFAULT_TREE_PAGE_SIZE);
  // As the protocol says, the page a token names and every page after it are streamed.
  for (;;) {
    const page = await readTreePage(cas, root, offset, pageSize, MAX_TREE_PAGE_BYTES, maxDirectoryBytes);
    const nextPageToken = page.nextOffset === undefined ? "" : formatPageToken(page.nextOffset);
    const writable = call.write({ directories: page.directories, nextPageToken });
    if (page.nextOffset === undefined) break;
    offset = page.nextOffset;
    if (!writable) await new Promise((resolve) => call.once("drain", resolve));
  }
  call.end();
}

function parsePageToken(token: string): number {
  if (token === "") return 0;
  const match = /^o([0-9]+)$/.exec(token);
  if (!match) throw invalidArgument("page_token", `"${token}" is not a token this server issued`);
  return Number(match[1]);
}

function formatPageToken(offset: number): string {
  return `o${offset}`;
}

async function decodeUpload(
  compressor: Compressor_Value,
  data: Buffer,
  digest: Digest,
  field: string,
): Promise<Buffer> {
  switch (compressor) {
    case Compressor_Value.IDENTITY:
      return data;
    case Compressor_Value.ZSTD:
      return zstdDecompressBounded(data, digest.sizeBytes, field);
    default:
      throw invalidArgument(
        `${field}.compressor`,
        `compressor ${Compressor_Value[compressor] ?? compressor} is not supported; use IDENTITY or ZSTD`,
      );
  }
}

function overLimit(field: string, total: number, limit: number): StatusError {
  return invalidArgument(
    field,
    `the batch holds ${total} bytes, over max_batch_total_size_bytes (${limit}); split it or use ByteStream`,
  );
}

function prefixed(error: StatusError, prefix: string): StatusError {
  if (error.message.startsWith("requests[")) return error;
  return new StatusError(error.code, `${prefix}: ${error.message}`, error.details);
}

function toWire(digest: Digest): { hash: string; sizeBytes: number } {
  return { hash: digest.hash, sizeBytes: digest.sizeBytes };
}
