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
 * (a 100,000-file tree has a few thousand directories, most with a handful
 * of child directories: a few hundred bytes each), and a small share of a
 * server's memory.
 */
export const DEFAULT_CHECKED_DIRECTORY_BYTES = 64 * 1024 * 1024;

/**
 * What one remembered directory costs in the heap, estimated from its parts
 * (measured: a Directory with 200,000 child directories of short names held
 * about 190 bytes per child): the key, the entry and its totals, then per
 * child its name, its Digest object and hash string.
 */
const ENTRY_BYTES = 256;
const CHILD_BYTES = 128;

/**
 * A directory costing more than this share of the memory is not remembered:
 * one very wide Directory (a hostile client's million children) would
 * otherwise push out everything every other build is reusing, for a
 * directory that is cheap to check again compared with the reads it saves.
 */
const LARGEST_SHARE = 16;

/** The estimated heap bytes of remembering `entry` under `key`. */
export function checkedDirectoryBytes(key: string, entry: CheckedDirectory): number {
  let bytes = ENTRY_BYTES + key.length + entry.totals.longestName.length;
  for (const child of entry.children) bytes += CHILD_BYTES + child.name.length + child.digest.hash.length;
  return bytes;
}

/**
 * Directory messages checked by earlier Executes, by digest key (which names
 * the digest function), least recently used forgotten past `capacityBytes`
 * of estimated heap (see checkedDirectoryBytes: bounded in bytes, not
 * entries, because a Directory's children are what it costs, and a client
 * chooses how many it has). Bazel sends many actions whose trees share most
 * of their directories (toolchains, headers, runfiles): with these, each
 * only costs a lookup.
 */
export class CheckedDirectories {
  private readonly entries = new Map<string, { entry: CheckedDirectory; bytes: number }>();
  private heldBytes = 0;

  /** `capacityBytes`: estimated heap the remembered directories may hold (0: none are remembered). */
  constructor(readonly capacityBytes: number) {}

  /** Directories remembered. */
  get size(): number {
    return this.entries.size;
  }

  /** Their estimated heap bytes, never more than capacityBytes. */
  get bytes(): number {
    return this.heldBytes;
  }

  /** The directory as it was checked, now counted as used; undefined when it was not (or was forgotten). */
  get(key: string): CheckedDirectory | undefined {
    const held = this.entries.get(key);
    if (held) {
      this.entries.delete(key);
      this.entries.set(key, held);
    }
    return held?.entry;
  }

  /** Remembers `entry`, forgetting the least recently used past the capacity; one too large is not remembered. */
  remember(key: string, entry: CheckedDirectory): void {
    const bytes = checkedDirectoryBytes(key, entry);
    if (bytes > this.capacityBytes / LARGEST_SHARE) return;
    this.forget(key);
    this.entries.set(key, { entry, bytes });
    this.heldBytes += bytes;
    for (const oldest of this.entries.keys()) {
      if (this.heldBytes <= this.capacityBytes) break;
      this.forget(oldest);
    }
  }

  private forget(key: string): void {
    const held = this.entries.get(key);
    if (!held) return;
    this.entries.delete(key);
    this.heldBytes -= held.bytes;
  }
}
