import { createHash, type Hash } from "node:crypto";
import { invalidArgument } from "../status/status.js";

/** The hash algorithms of Subresource Integrity (W3C SRI) that Berth checks. */
const ALGORITHMS = ["sha256", "sha384", "sha512"] as const;
export type SriAlgorithm = (typeof ALGORITHMS)[number];

const DIGEST_BYTES: Record<SriAlgorithm, number> = { sha256: 32, sha384: 48, sha512: 64 };

/** One checksum of a `checksum.sri` qualifier: `sha256-<base64 of the digest>`. */
export interface SriChecksum {
  readonly algorithm: SriAlgorithm;
  /** The digest's bytes as lowercase hex (what CAS digests use). */
  readonly hex: string;
  /** As the client wrote it, for messages. */
  readonly text: string;
}

/**
 * The checksums of a `checksum.sri` value: whitespace-separated
 * `alg-base64[?options]` tokens. The qualifier is met when one of them
 * matches (qualifiers.md), so tokens of algorithms Berth does not know are
 * skipped; a value with none it knows, or a malformed token, is refused.
 */
export function parseSri(value: string, field: string): SriChecksum[] {
  const tokens = value.split(/\s+/).filter((t) => t !== "");
  if (tokens.length === 0) throw invalidArgument(field, "checksum.sri is empty");
  const checksums: SriChecksum[] = [];
  for (const token of tokens) {
    const dash = token.indexOf("-");
    const algorithm = token.slice(0, Math.max(0, dash)).toLowerCase();
    if (!(ALGORITHMS as readonly string[]).includes(algorithm)) continue;
    const base64 = token.slice(dash + 1).split("?")[0] as string;
    const bytes = /^[A-Za-z0-9+/]+={0,2}$/.test(base64) ? Buffer.from(base64, "base64") : Buffer.alloc(0);
    const alg = algorithm as SriAlgorithm;
    if (bytes.byteLength !== DIGEST_BYTES[alg]) {
      throw invalidArgument(
        field,
        `checksum.sri token "${clip(token)}" is not ${alg}- followed by the base64 of a ${DIGEST_BYTES[alg]}-byte digest`,
      );
    }
    checksums.push({ algorithm: alg, hex: bytes.toString("hex"), text: token });
  }
  if (checksums.length === 0) {
    throw invalidArgument(field, `checksum.sri "${clip(value)}" names none of ${ALGORITHMS.join(", ")}`);
  }
  return checksums;
}

/** The SRI form of a digest's hex, e.g. for a message saying what content had. */
export function sriOf(algorithm: SriAlgorithm, hex: string): string {
  return `${algorithm}-${Buffer.from(hex, "hex").toString("base64")}`;
}

/**
 * Hashes content once per algorithm the checksums use, then says whether one
 * of them matched. `known`: an algorithm whose hash the caller computes
 * anyway (the CAS's digest function), not computed a second time here.
 */
export class SriCheck {
  private readonly hashes = new Map<SriAlgorithm, Hash>();

  constructor(
    private readonly checksums: readonly SriChecksum[],
    private readonly known?: string,
  ) {
    for (const c of checksums) {
      if (c.algorithm !== known && !this.hashes.has(c.algorithm)) this.hashes.set(c.algorithm, createHash(c.algorithm));
    }
  }

  update(chunk: Uint8Array): void {
    for (const hash of this.hashes.values()) hash.update(chunk);
  }

  /** undefined when a checksum matched; otherwise what the content's checksums were instead. `knownHex`: the known algorithm's hash. */
  mismatch(knownHex?: string): string | undefined {
    const actual = new Map<SriAlgorithm, string>();
    for (const [algorithm, hash] of this.hashes) actual.set(algorithm, hash.digest("hex"));
    for (const c of this.checksums) if (c.algorithm === this.known && knownHex) actual.set(c.algorithm, knownHex);
    if (this.checksums.some((c) => actual.get(c.algorithm) === c.hex)) return undefined;
    const had = [...actual].map(([algorithm, hex]) => sriOf(algorithm, hex)).join(" ");
    return `the content does not match checksum.sri ${this.checksums.map((c) => c.text).join(" ")}: it has ${had}`;
  }
}

function clip(text: string): string {
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}
