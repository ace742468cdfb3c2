import type { Digest } from "../digest/digest.js";
import { type DigestFunction, hashBytes } from "../digest/functions.js";

const emptyHashes = new Map<DigestFunction, string>();

/** Whether `digest` names the empty blob, which every CAS holds without storing it. */
export async function isEmptyBlob(digest: Digest): Promise<boolean> {
  if (digest.sizeBytes !== 0) return false;
  let hash = emptyHashes.get(digest.fn);
  if (hash === undefined) {
    hash = await hashBytes(digest.fn, new Uint8Array(0));
    emptyHashes.set(digest.fn, hash);
  }
  return hash === digest.hash;
}
