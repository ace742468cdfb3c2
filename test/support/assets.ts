import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { ServiceError } from "@grpc/grpc-js";
import {
  FetchBlobRequest,
  type FetchBlobResponse,
  FetchDirectoryRequest,
  PushBlobRequest,
  PushDirectoryRequest,
} from "../../src/gen/build/bazel/remote/asset/v1/remote_asset.js";
import { Compressor_Value } from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../../src/status/status.js";
import type { WireDigest } from "./blobs.js";
import type { TestFarm } from "./farm.js";
import { unaryCall } from "./rpc.js";

/** The `checksum.sri` qualifier Bazel sends for a sha256 (or another algorithm's) checksum. */
export function sri(data: Buffer, algorithm = "sha256"): { name: string; value: string } {
  return { name: "checksum.sri", value: `${algorithm}-${createHash(algorithm).update(data).digest("base64")}` };
}

export function failsWith(code: number, message: RegExp) {
  return (err: ServiceError) => {
    assert.equal(err.code, code, `${Code[code as never] ?? code} expected, got ${err.code}: ${err.details}`);
    assert.match(err.details, message);
    return true;
  };
}

export function fetchBlob(farm: TestFarm, request: Partial<FetchBlobRequest>): Promise<FetchBlobResponse> {
  return unaryCall(farm.clients.fetch.fetchBlob.bind(farm.clients.fetch), FetchBlobRequest.fromPartial(request));
}

export function fetchDirectory(farm: TestFarm, request: Partial<FetchDirectoryRequest>) {
  return unaryCall(
    farm.clients.fetch.fetchDirectory.bind(farm.clients.fetch),
    FetchDirectoryRequest.fromPartial(request),
  );
}

export function pushBlob(farm: TestFarm, request: Partial<PushBlobRequest>) {
  return unaryCall(farm.clients.push.pushBlob.bind(farm.clients.push), PushBlobRequest.fromPartial(request));
}

export function pushDirectory(farm: TestFarm, request: Partial<PushDirectoryRequest>) {
  return unaryCall(farm.clients.push.pushDirectory.bind(farm.clients.push), PushDirectoryRequest.fromPartial(request));
}

export async function readBlob(farm: TestFarm, digest: WireDigest, instanceName = ""): Promise<Buffer> {
  const response = await unaryCall(farm.clients.cas.batchReadBlobs.bind(farm.clients.cas), {
    instanceName,
    digests: [digest],
    acceptableCompressors: [],
    digestFunction: 0,
  });
  const entry = response.responses[0];
  assert.equal(entry?.status?.code, Code.OK, entry?.status?.message);
  return Buffer.from(entry?.data ?? []);
}

export async function upload(farm: TestFarm, ...blobs: { data: Buffer; digest: WireDigest }[]): Promise<void> {
  const response = await unaryCall(farm.clients.cas.batchUpdateBlobs.bind(farm.clients.cas), {
    instanceName: "",
    digestFunction: 0,
    requests: blobs.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
  });
  for (const r of response.responses) assert.equal(r.status?.code, Code.OK, r.status?.message);
}
