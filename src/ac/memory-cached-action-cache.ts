import { type Digest, digestKey } from "../digest/digest.js";
import { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { ActionCache } from "./action-cache.js";

/** A result larger than this share of the cap is not held: one huge result must not empty the cache. */
const LARGEST_SHARE = 16;

/**
 * Keeps the results most recently read or stored in memory, encoded, in
 * front of another action cache. Reading an entry from disk costs four
 * thread-pool round trips (open, stat, read, close), most of a cache hit's
 * time. Each hit decodes a fresh copy, so no caller can change what the next
 * one gets. The inner cache stays the authority for what is stored: a put
 * is held here only once it has succeeded there.
 */
export class MemoryCachedActionCache implements ActionCache {
  /** Insertion order is recency order: a hit is deleted and set again. */
  readonly #entries = new Map<string, Uint8Array>();
  #totalBytes = 0;

  constructor(
    private readonly inner: ActionCache,
    /** Total bytes of encoded results held; the least recently used go first. */
    private readonly maxTotalBytes: number,
  ) {}

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const key = keyOf(instanceName, actionDigest);
    const held = this.#entries.get(key);
    if (held) {
      this.#entries.delete(key);
      this.#entries.set(key, held);
      return ActionResult.decode(held);
    }
    const result = await this.inner.get(instanceName, actionDigest);
    if (result) this.#remember(key, result);
    return result;
  }

  async put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    const key = keyOf(instanceName, actionDigest);
    // Whatever happens below, an older result of the action must not be answered from here.
    this.#forget(key);
    await this.inner.put(instanceName, actionDigest, result);
    this.#remember(key, result);
  }

  /** Bytes held now. */
  get bytes(): number {
    return this.#totalBytes;
  }

  #remember(key: string, result: ActionResult): void {
    const encoded = ActionResult.encode(result).finish();
    if (encoded.byteLength > this.maxTotalBytes / LARGEST_SHARE) return;
    this.#forget(key);
    this.#entries.set(key, encoded);
    this.#totalBytes += encoded.byteLength;
    for (const [oldest, bytes] of this.#entries) {
      if (this.#totalBytes <= this.maxTotalBytes) break;
      this.#entries.delete(oldest);
      this.#totalBytes -= bytes.byteLength;
    }
  }

  #forget(key: string): void {
    const held = this.#entries.get(key);
    if (held === undefined) return;
    this.#entries.delete(key);
    this.#totalBytes -= held.byteLength;
  }
}

function keyOf(instanceName: string, actionDigest: Digest): string {
  return `${instanceName}\0${digestKey(actionDigest)}`;
}
