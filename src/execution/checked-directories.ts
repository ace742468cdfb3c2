import type { MeasuredSubtree, SubtreeTotals } from "../cas/tree-limits.js";
import type { Digest } from "../digest/digest.js";

/**
 * A Directory message an input tree check accepted: its names were valid,
 * and below it nothing looped. What it says never changes (it is
 * content-addressed), so neither do these; whether its blob is still in the
 * CAS is another matter, which this does not answer.
 */
export interface CheckedDirectory extends MeasuredSubtree {
  readonly totals: SubtreeTotals;
  /** Its child directories, in the order of its `directories`. */
  readonly children: readonly { readonly name: string; readonly digest: Digest }[];
  /** Its own files, directories and symlinks. */
  readonly ownEntries: number;
}

/**
 * Enough for the distinct directories of several large builds' input trees
 * (a 100,000-file tree has a few thousand), at a few hundred bytes each:
 * some tens of megabytes at most.
 */
export const DEFAULT_CHECKED_DIRECTORIES = 100_000;

/**
 * Directory messages checked by earlier Executes, by digest key (which names
 * the digest function), least recently used forgotten past `capacity`. Bazel
 * sends many actions whose trees share most of their directories
 * (toolchains, headers, runfiles): with these, each only costs a lookup.
 * About 200 bytes plus 150 per child directory each.
 */
export class CheckedDirectories {
  private readonly entries = new Map<string, CheckedDirectory>();

  /** `capacity`: Directory messages remembered (0: none). */
  constructor(readonly capacity: number) {}

  get size(): number {
    return this.entries.size;
  }

  /** The directory as it was checked, now counted as used; undefined when it was not (or was forgotten). */
  get(key: string): CheckedDirectory | undefined {
    const entry = this.entries.get(key);
    if (entry) {
      this.entries.delete(key);
      this.entries.set(key, entry);
    }
    return entry;
  }

  remember(key: string, entry: CheckedDirectory): void {
    if (this.capacity <= 0) return;
    this.entries.delete(key);
    this.entries.set(key, entry);
    for (const oldest of this.entries.keys()) {
      if (this.entries.size <= this.capacity) break;
      this.entries.delete(oldest);
    }
  }
}
