import { PinnedLru } from "../cache/pinned-lru.js";
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
  /** Nothing here is ever pinned: the cache only orders the entries and keeps them within the cap. */
  readonly #entries: PinnedLru<string, Uint8Array>;
  /** Puts begun so far. */
  #puts = 0;

  constructor(
    private readonly inner: ActionCache,
    /** Total bytes of encoded results held; the least recently used go first. */
    private readonly maxTotalBytes: number,
  ) {
    this.#entries = new PinnedLru({ maxBytes: maxTotalBytes });
  }

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const key = keyOf(instanceName, actionDigest);
    const held = this.#entries.touch(key);
    if (held) return ActionResult.decode(held);
    const putsBefore = this.#puts;
    const result = await this.inner.get(instanceName, actionDigest);
    // A put since the read began may have held a newer result, which this older read must not replace.
    if (result && this.#puts === putsBefore) this.#remember(key, result);
    return result;
  }

  async put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    const key = keyOf(instanceName, actionDigest);
    // Whatever happens below, an older result of the action must not be answered from here.
    this.#puts++;
    void this.#entries.delete(key);
    await this.inner.put(instanceName, actionDigest, result);
    this.#remember(key, result);
  }

  /** Bytes held now. */
  get bytes(): number {
    return this.#entries.bytes;
  }

  /** Synchronous: without a disposal, the index changes before delete and insert return. */
  #remember(key: string, result: ActionResult): void {
    const encoded = ActionResult.encode(result).finish();
    if (encoded.byteLength > this.maxTotalBytes / LARGEST_SHARE) return;
    void this.#entries.delete(key);
    void this.#entries.insert(key, encoded, encoded.byteLength);
  }
}

function keyOf(instanceName: string, actionDigest: Digest): string {
  return `${instanceName}\0${digestKey(actionDigest)}`;
}
