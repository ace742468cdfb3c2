import { createHash } from "node:crypto";
import { createBLAKE3 } from "hash-wasm";

/** An incremental hash over a blob's bytes. */
export interface Hasher {
  update(data: Uint8Array): void;
  /** Lowercase hex of the hash; the hasher must not be used afterwards. */
  digestHex(): string;
}

/** A digest function Berth supports, with its REAPI DigestFunction.Value number. */
export interface DigestFunction {
  /** Lowercase name, as in resource names ("sha256", "blake3"). */
  readonly name: string;
  readonly wireValue: number;
  readonly hexLength: number;
  /**
   * Whether resource names may omit the function's segment; the protocol
   * lets a server infer these from the hash length.
   */
  readonly inferableFromLength: boolean;
  createHasher(): Promise<Hasher>;
}

function nodeHash(algorithm: string): () => Promise<Hasher> {
  return async () => {
    const hash = createHash(algorithm);
    return {
      update: (data) => {
        hash.update(data);
      },
      digestHex: () => hash.digest("hex"),
    };
  };
}

async function blake3Hasher(): Promise<Hasher> {
  const hash = await createBLAKE3();
  return {
    update: (data) => {
      hash.update(data);
    },
    digestHex: () => hash.digest("hex"),
  };
}

export const SHA256: DigestFunction = {
  name: "sha256",
  wireValue: 1,
  hexLength: 64,
  inferableFromLength: true,
  createHasher: nodeHash("sha256"),
};

/** Every function Berth serves, SHA-256 first (the default). */
export const DIGEST_FUNCTIONS: readonly DigestFunction[] = [
  SHA256,
  { name: "sha1", wireValue: 2, hexLength: 40, inferableFromLength: true, createHasher: nodeHash("sha1") },
  { name: "md5", wireValue: 3, hexLength: 32, inferableFromLength: true, createHasher: nodeHash("md5") },
  { name: "sha384", wireValue: 5, hexLength: 96, inferableFromLength: true, createHasher: nodeHash("sha384") },
  { name: "sha512", wireValue: 6, hexLength: 128, inferableFromLength: true, createHasher: nodeHash("sha512") },
  { name: "blake3", wireValue: 9, hexLength: 64, inferableFromLength: false, createHasher: blake3Hasher },
];

/** Names of DigestFunction.Value numbers Berth does not serve, for messages. */
const UNSUPPORTED_NAMES: Record<number, string> = { 4: "VSO", 7: "MURMUR3", 8: "SHA256TREE", 10: "GITSHA1" };

export function digestFunctionByWire(value: number): DigestFunction | undefined {
  return DIGEST_FUNCTIONS.find((fn) => fn.wireValue === value);
}

export function digestFunctionByName(name: string): DigestFunction | undefined {
  return DIGEST_FUNCTIONS.find((fn) => fn.name === name);
}

/** The function an old client meant when it sent no digest_function: by hash length. */
export function digestFunctionByLength(hexLength: number): DigestFunction | undefined {
  return DIGEST_FUNCTIONS.find((fn) => fn.inferableFromLength && fn.hexLength === hexLength);
}

export function describeWireValue(value: number): string {
  const fn = digestFunctionByWire(value);
  if (fn) return fn.name.toUpperCase();
  return UNSUPPORTED_NAMES[value] ?? `${value}`;
}

export async function hashBytes(fn: DigestFunction, data: Uint8Array): Promise<string> {
  const hasher = await fn.createHasher();
  hasher.update(data);
  return hasher.digestHex();
}
