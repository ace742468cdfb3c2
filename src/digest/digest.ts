import { Code, invalidArgument, StatusError } from "../status/status.js";
import {
  DIGEST_FUNCTIONS,
  type DigestFunction,
  describeWireValue,
  digestFunctionByLength,
  digestFunctionByWire,
  hashBytes,
  SHA256,
} from "./functions.js";

/** A validated content address: the function, its lowercase hex hash and the blob's size. */
export interface Digest {
  readonly fn: DigestFunction;
  readonly hash: string;
  readonly sizeBytes: number;
}

/** What a request carries before validation (the wire Digest message). */
export interface RawDigest {
  hash: string;
  sizeBytes: number;
}

const HEX = /^[0-9a-f]+$/;

/**
 * Picks the digest function a request asked for. UNKNOWN (0) means an older
 * client: the function is then inferred from the length of `sampleHash`.
 */
export function resolveDigestFunction(
  wireValue: number,
  sampleHash: string | undefined,
  field = "digest_function",
): DigestFunction {
  if (wireValue !== 0) {
    const fn = digestFunctionByWire(wireValue);
    if (!fn) {
      const supported = DIGEST_FUNCTIONS.map((f) => f.name.toUpperCase()).join(", ");
      throw invalidArgument(
        field,
        `digest function ${describeWireValue(wireValue)} is not supported; this server supports ${supported}`,
      );
    }
    return fn;
  }
  // A hash of no known length is reported against the digest itself, by parseDigest.
  if (sampleHash === undefined) return SHA256;
  return digestFunctionByLength(sampleHash.length) ?? SHA256;
}

/** Validates a wire digest against a digest function; `field` names it in errors. */
export function parseDigest(fn: DigestFunction, raw: RawDigest | undefined, field: string): Digest {
  if (!raw) throw invalidArgument(field, "digest is missing");
  const { hash, sizeBytes } = raw;
  if (hash.length !== fn.hexLength) {
    throw invalidArgument(
      `${field}.hash`,
      `"${truncate(hash)}" has ${hash.length} characters; a ${fn.name} hash has ${fn.hexLength} lowercase hex characters`,
    );
  }
  if (!HEX.test(hash)) {
    throw invalidArgument(`${field}.hash`, `"${truncate(hash)}" is not lowercase hexadecimal`);
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
    throw invalidArgument(`${field}.size_bytes`, `${sizeBytes} is not a valid size (must be 0 or more)`);
  }
  return { fn, hash, sizeBytes };
}

function truncate(s: string): string {
  return s.length > 140 ? `${s.slice(0, 140)}…` : s;
}

/** "hash/size", the form people and resource names use. */
export function formatDigest(d: Digest): string {
  return `${d.hash}/${d.sizeBytes}`;
}

/** A key unique across digest functions, usable as a relative file path. */
export function digestKey(d: Digest): string {
  return `${d.fn.name}/${d.hash.slice(0, 2)}/${d.hash}-${d.sizeBytes}`;
}

export function sameDigest(a: Digest, b: Digest): boolean {
  return a.fn === b.fn && a.hash === b.hash && a.sizeBytes === b.sizeBytes;
}

export async function digestOf(fn: DigestFunction, data: Uint8Array): Promise<Digest> {
  return { fn, hash: await hashBytes(fn, data), sizeBytes: data.byteLength };
}

/** Throws INVALID_ARGUMENT when `data` is not the blob `expected` names. */
export async function verifyBlob(expected: Digest, data: Uint8Array, field: string): Promise<void> {
  if (data.byteLength !== expected.sizeBytes) {
    throw new StatusError(
      Code.INVALID_ARGUMENT,
      `${field}: ${data.byteLength} bytes were sent for a blob of ${expected.sizeBytes} bytes (${formatDigest(expected)})`,
      { fieldViolations: [{ field, description: "size does not match the digest" }] },
    );
  }
  const actual = await hashBytes(expected.fn, data);
  if (actual !== expected.hash) {
    throw new StatusError(
      Code.INVALID_ARGUMENT,
      `${field}: the data's ${expected.fn.name} is ${actual}, not ${expected.hash} as its digest says`,
      { fieldViolations: [{ field, description: "hash does not match the digest" }] },
    );
  }
}
