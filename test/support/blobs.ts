import { createHash, randomBytes } from "node:crypto";
import { Directory } from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";

export interface WireDigest {
  hash: string;
  sizeBytes: number;
}

export function sha256(data: Uint8Array | string): WireDigest {
  const bytes = typeof data === "string" ? Buffer.from(data) : data;
  return { hash: createHash("sha256").update(bytes).digest("hex"), sizeBytes: bytes.byteLength };
}

export function randomBlob(size: number): { data: Buffer; digest: WireDigest } {
  const data = randomBytes(size);
  return { data, digest: sha256(data) };
}

/** A Directory message and its encoding and digest, ready to upload. */
export function directoryBlob(directory: Partial<Directory>): {
  data: Buffer;
  digest: WireDigest;
  directory: Directory;
} {
  const full = Directory.fromPartial(directory);
  const data = Buffer.from(Directory.encode(full).finish());
  return { data, digest: sha256(data), directory: full };
}

export const EMPTY_SHA256: WireDigest = sha256(Buffer.alloc(0));
