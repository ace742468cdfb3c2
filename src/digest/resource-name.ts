import { invalidArgument } from "../status/status.js";
import { type Digest, parseDigest } from "./digest.js";
import { digestFunctionByLength, digestFunctionByName } from "./functions.js";

/** Compressors of ByteStream resource names ("compressed-blobs/zstd/…"). */
export type Compression = "identity" | "zstd";

/** A ByteStream resource name, parsed. */
export interface BlobResource {
  instanceName: string;
  digest: Digest;
  compression: Compression;
  /** For uploads: the client's upload id, which with the digest names the upload. */
  uploadId?: string;
}

const WIRE_COMPRESSORS: Record<string, Compression | null> = {
  zstd: "zstd",
  identity: null, // never valid in a name: uncompressed data uses "blobs/"
  deflate: null,
  brotli: null,
};

/** `{instance}/blobs/{fn/}{hash}/{size}` or `{instance}/compressed-blobs/{comp}/{fn/}{hash}/{size}`. */
export function parseReadResourceName(name: string): BlobResource {
  const segments = name.split("/");
  const at = segments.findIndex((s) => s === "blobs" || s === "compressed-blobs");
  if (at < 0) {
    throw invalidArgument(
      "resource_name",
      `"${name}" is not of the form [{instance}/]blobs/[{digest_function}/]{hash}/{size}`,
    );
  }
  const parsed = parseBlobPart(name, segments, at);
  if (parsed.rest.length > 0) {
    throw invalidArgument("resource_name", `"${name}" has unexpected segments after the size`);
  }
  return { instanceName: segments.slice(0, at).join("/"), digest: parsed.digest, compression: parsed.compression };
}

/** `{instance}/uploads/{uuid}/blobs/{fn/}{hash}/{size}{/metadata}` and the compressed form. */
export function parseWriteResourceName(name: string): BlobResource {
  const segments = name.split("/");
  const at = segments.indexOf("uploads");
  const kind = segments[at + 2];
  if (at < 0 || (kind !== "blobs" && kind !== "compressed-blobs")) {
    throw invalidArgument(
      "resource_name",
      `"${name}" is not of the form [{instance}/]uploads/{uuid}/blobs/[{digest_function}/]{hash}/{size}`,
    );
  }
  const uploadId = segments[at + 1] ?? "";
  if (uploadId === "") throw invalidArgument("resource_name", `"${name}" has an empty upload id`);
  const parsed = parseBlobPart(name, segments, at + 2);
  return {
    instanceName: segments.slice(0, at).join("/"),
    digest: parsed.digest,
    compression: parsed.compression,
    uploadId,
  };
}

function parseBlobPart(name: string, segments: string[], at: number) {
  let i = at + 1;
  let compression: Compression = "identity";
  if (segments[at] === "compressed-blobs") {
    const wire = segments[i++] ?? "";
    const known = WIRE_COMPRESSORS[wire];
    if (!known) {
      throw invalidArgument("resource_name", `compressor "${wire}" in "${name}" is not supported; use zstd`);
    }
    compression = known;
  }
  let fnName: string | undefined;
  if (segments[i] !== undefined && /[g-z]/.test(segments[i] as string)) {
    fnName = segments[i++];
  }
  const hash = segments[i++];
  const sizeText = segments[i++];
  if (hash === undefined || sizeText === undefined) {
    throw invalidArgument("resource_name", `"${name}" lacks a hash and size`);
  }
  if (!/^[0-9]+$/.test(sizeText)) {
    throw invalidArgument("resource_name", `size "${sizeText}" in "${name}" is not a non-negative integer`);
  }
  let fn = fnName === undefined ? digestFunctionByLength(hash.length) : digestFunctionByName(fnName);
  if (!fn) {
    const what = fnName === undefined ? `a hash of ${hash.length} characters` : `digest function "${fnName}"`;
    throw invalidArgument("resource_name", `${what} in "${name}" is not supported`);
  }
  if (fnName !== undefined && fn.inferableFromLength) {
    // The protocol says such names omit the segment; accept it anyway, it is unambiguous.
    fn = digestFunctionByName(fnName) ?? fn;
  }
  const digest = parseDigest(fn, { hash, sizeBytes: Number(sizeText) }, "resource_name");
  return { digest, compression, rest: segments.slice(i) };
}

/** The read resource name of a blob, as clients build it. */
export function formatReadResourceName(
  instanceName: string,
  digest: Digest,
  compression: Compression = "identity",
): string {
  const prefix = instanceName === "" ? "" : `${instanceName}/`;
  const kind = compression === "identity" ? "blobs" : `compressed-blobs/${compression}`;
  const fn = digest.fn.inferableFromLength ? "" : `${digest.fn.name}/`;
  return `${prefix}${kind}/${fn}${digest.hash}/${digest.sizeBytes}`;
}

export function formatWriteResourceName(
  instanceName: string,
  uploadId: string,
  digest: Digest,
  compression: Compression = "identity",
): string {
  const prefix = instanceName === "" ? "" : `${instanceName}/`;
  return `${prefix}uploads/${uploadId}/${formatReadResourceName("", digest, compression)}`;
}
