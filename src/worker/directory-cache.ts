import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/**
 * Enough for the directories of many large input trees (a 100,000-file tree
 * has a few MB of Directory messages), and a bounded share of a worker's
 * memory whatever size of Directory messages actions send.
 */
export const DEFAULT_DIRECTORY_CACHE_BYTES = 256 * 1024 * 1024;

/**
 * A decoded Directory in the heap, estimated from its encoded size: each
 * of its nodes is a few objects and strings, about three to four times the
 * bytes it takes on the wire, plus the entry and its key.
 */
function estimatedBytes(key: string, encodedBytes: number): number {
  return 256 + key.length + 4 * encodedBytes;
}

/**
 * Directory messages the worker has already fetched and checked, by digest
 * key. A digest names one content forever, so entries never go stale; the
 * least recently used are dropped past `maxBytes` of estimated heap
 * (bounded in bytes, not entries: an action chooses how large its Directory
 * messages are, up to inputLimits.maxDirectoryBytes each).
 */
export class DirectoryCache {
  private readonly entries = new Map<string, { directory: Directory; bytes: number }>();
  private heldBytes = 0;

  constructor(readonly maxBytes = DEFAULT_DIRECTORY_CACHE_BYTES) {}

  get(key: string): Directory | undefined {
    const held = this.entries.get(key);
    if (held) {
      // Map keeps insertion order: moving a hit to the end makes the first entry the least recently used.
      this.entries.delete(key);
      this.entries.set(key, held);
    }
    return held?.directory;
  }

  /** Remembers `directory`, `encodedBytes` long on the wire; one larger than a sixteenth of the cache is not kept. */
  set(key: string, directory: Directory, encodedBytes: number): void {
    const bytes = estimatedBytes(key, encodedBytes);
    if (bytes > this.maxBytes / 16) return;
    this.forget(key);
    this.entries.set(key, { directory, bytes });
    this.heldBytes += bytes;
    for (const oldest of this.entries.keys()) {
      if (this.heldBytes <= this.maxBytes) break;
      this.forget(oldest);
    }
  }

  get size(): number {
    return this.entries.size;
  }

  /** Estimated heap bytes held, never more than maxBytes. */
  get bytes(): number {
    return this.heldBytes;
  }

  private forget(key: string): void {
    const held = this.entries.get(key);
    if (!held) return;
    this.entries.delete(key);
    this.heldBytes -= held.bytes;
  }
}
