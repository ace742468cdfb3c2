import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/**
 * Directory messages the worker has already fetched and checked, by digest
 * key. A digest names one content forever, so entries never go stale; the
 * least recently used are dropped past `maxEntries`.
 */
export class DirectoryCache {
  private readonly entries = new Map<string, Directory>();

  constructor(private readonly maxEntries = 100_000) {}

  get(key: string): Directory | undefined {
    const directory = this.entries.get(key);
    if (directory) {
      // Map keeps insertion order: moving a hit to the end makes the first entry the least recently used.
      this.entries.delete(key);
      this.entries.set(key, directory);
    }
    return directory;
  }

  set(key: string, directory: Directory): void {
    this.entries.delete(key);
    this.entries.set(key, directory);
    if (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next().value;
      if (oldest !== undefined) this.entries.delete(oldest);
    }
  }

  get size(): number {
    return this.entries.size;
  }
}
