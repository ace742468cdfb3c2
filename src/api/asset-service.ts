import type { handleUnaryCall } from "@grpc/grpc-js";
import type { AssetAnswer, AssetStore } from "../asset/asset-store.js";
import { type Digest, parseDigest, resolveDigestFunction } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { FetchServer, PushServer, Qualifier } from "../gen/build/bazel/remote/asset/v1/remote_asset.js";
import type { Duration } from "../gen/google/protobuf/duration.js";
import type { Timestamp } from "../gen/google/protobuf/timestamp.js";
import type { Logger } from "../log/log.js";
import { OK_STATUS } from "../status/rpc-status.js";
import { Code, invalidArgument, toStatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

/** The Remote Asset API's Fetch service: wire ⇄ AssetStore. */
export function fetchService(store: AssetStore, instances: InstanceNames, log: Logger): FetchServer {
  return {
    fetchBlob: call(log, "FetchBlob", async (request) => {
      instances.check(request.instanceName);
      const fn = requestedFunction(request.digestFunction);
      const answer = await store.fetchBlob({
        instanceName: request.instanceName,
        uris: request.uris,
        qualifiers: request.qualifiers,
        fn,
        oldestAccepted: millisOf(request.oldestContentAccepted, "oldest_content_accepted"),
        timeoutMs: durationOf(request.timeout, "timeout"),
      });
      return { ...answered(answer, request.qualifiers, fn), blobDigest: wire(answer.digest) };
    }),

    fetchDirectory: call(log, "FetchDirectory", async (request) => {
      instances.check(request.instanceName);
      const fn = requestedFunction(request.digestFunction);
      const answer = await store.fetchDirectory({
        instanceName: request.instanceName,
        uris: request.uris,
        qualifiers: request.qualifiers,
        fn,
        oldestAccepted: millisOf(request.oldestContentAccepted, "oldest_content_accepted"),
      });
      return { ...answered(answer, request.qualifiers, fn), rootDirectoryDigest: wire(answer.digest) };
    }),
  };
}

/** The Remote Asset API's Push service: wire ⇄ AssetStore. */
export function pushService(store: AssetStore, instances: InstanceNames, log: Logger): PushServer {
  return {
    pushBlob: call(log, "PushBlob", async (request) => {
      instances.check(request.instanceName);
      if (request.uris.length === 0) throw invalidArgument("uris", "at least one URI is required");
      const fn = resolveDigestFunction(request.digestFunction, request.blobDigest?.hash);
      await store.pushBlob({
        instanceName: request.instanceName,
        uris: request.uris,
        qualifiers: request.qualifiers,
        fn,
        blob: parseDigest(fn, request.blobDigest, "blob_digest"),
        expireAt: millisOf(request.expireAt, "expire_at"),
        ...references(fn, request.referencesBlobs, request.referencesDirectories),
      });
      return {};
    }),

    pushDirectory: call(log, "PushDirectory", async (request) => {
      instances.check(request.instanceName);
      if (request.uris.length === 0) throw invalidArgument("uris", "at least one URI is required");
      const fn = resolveDigestFunction(request.digestFunction, request.rootDirectoryDigest?.hash);
      await store.pushDirectory({
        instanceName: request.instanceName,
        uris: request.uris,
        qualifiers: request.qualifiers,
        fn,
        root: parseDigest(fn, request.rootDirectoryDigest, "root_directory_digest"),
        expireAt: millisOf(request.expireAt, "expire_at"),
        ...references(fn, request.referencesBlobs, request.referencesDirectories),
      });
      return {};
    }),
  };
}

/**
 * A unary handler. A fetch an origin refused, or one past its timeout, is no
 * fault of the server: said at info (each URI's reason was logged by the
 * fetcher), not as an error.
 */
function call<Req, Res>(
  log: Logger,
  method: string,
  handler: (request: Req) => Promise<Res>,
): handleUnaryCall<Req, Res> {
  return (grpcCall, callback) => {
    handler(grpcCall.request).then(
      (response) => callback(null, response),
      (err: unknown) => {
        const error = toStatusError(err);
        if (error.code === Code.PERMISSION_DENIED || error.code === Code.DEADLINE_EXCEEDED) {
          log.info({ method, code: error.code }, `${method}: ${error.message}`);
        } else {
          logFailure(log, method, err);
        }
        callback(toServiceError(err));
      },
    );
  };
}

/** Fetch requests name their function outright; unset (an older client) is SHA-256, as the protocol says. */
function requestedFunction(wireValue: number): DigestFunction {
  return resolveDigestFunction(wireValue, undefined);
}

/** What every successful Fetch answers besides the digest. Request headers (credentials) are not echoed. */
function answered(answer: AssetAnswer, qualifiers: readonly Qualifier[], fn: DigestFunction) {
  return {
    status: OK_STATUS,
    uri: answer.uri,
    qualifiers: qualifiers.filter((q) => !/^(bazel\.auth_headers$|http_header:|http_header_url:)/.test(q.name)),
    expiresAt: answer.expireAt === undefined ? undefined : timestampOf(answer.expireAt),
    digestFunction: fn.wireValue,
  };
}

function references(
  fn: DigestFunction,
  blobs: readonly { hash: string; sizeBytes: number }[],
  directories: readonly { hash: string; sizeBytes: number }[],
): { referencedBlobs: Digest[]; referencedDirectories: Digest[] } {
  return {
    referencedBlobs: blobs.map((d, i) => parseDigest(fn, d, `references_blobs[${i}]`)),
    referencedDirectories: directories.map((d, i) => parseDigest(fn, d, `references_directories[${i}]`)),
  };
}

function millisOf(timestamp: Timestamp | undefined, field: string): number | undefined {
  if (!timestamp) return undefined;
  if (!Number.isSafeInteger(timestamp.seconds) || timestamp.nanos < 0 || timestamp.nanos > 999_999_999) {
    throw invalidArgument(field, "is not a valid timestamp");
  }
  return timestamp.seconds * 1000 + Math.floor(timestamp.nanos / 1e6);
}

function durationOf(duration: Duration | undefined, field: string): number | undefined {
  if (!duration) return undefined;
  if (duration.seconds < 0 || duration.nanos < 0) throw invalidArgument(field, "is negative");
  return duration.seconds * 1000 + Math.floor(duration.nanos / 1e6);
}

function timestampOf(ms: number): Timestamp {
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function wire(d: Digest): { hash: string; sizeBytes: number } {
  return { hash: d.hash, sizeBytes: d.sizeBytes };
}
