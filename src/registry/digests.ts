import { createHash, type Hash } from "node:crypto";

/** Content digests as registries use them: `algorithm:hex`. */
const HEX_LENGTHS: Record<string, number> = { sha256: 64, sha384: 96, sha512: 128 };

export interface ParsedDigest {
  readonly algorithm: "sha256" | "sha384" | "sha512";
  readonly hex: string;
}

/** The digest's parts, or a sentence saying what is wrong with it. */
export function parseContentDigest(digest: string): ParsedDigest | string {
  const colon = digest.indexOf(":");
  const algorithm = digest.slice(0, Math.max(colon, 0));
  const hex = digest.slice(colon + 1);
  const length = HEX_LENGTHS[algorithm];
  if (colon <= 0 || length === undefined) {
    return `digest "${digest.slice(0, 150)}" does not use a supported algorithm (${Object.keys(HEX_LENGTHS).join(", ")})`;
  }
  if (hex.length !== length || !/^[0-9a-f]+$/.test(hex)) {
    return `digest "${digest.slice(0, 150)}" does not have ${length} lowercase hexadecimal digits`;
  }
  return { algorithm: algorithm as ParsedDigest["algorithm"], hex };
}

export function hasher(digest: ParsedDigest): Hash {
  return createHash(digest.algorithm);
}

export function digestOf(algorithm: ParsedDigest["algorithm"], data: Uint8Array): string {
  return `${algorithm}:${createHash(algorithm).update(data).digest("hex")}`;
}
