import { findLines } from "./find-lines.js";

/** A directory an action writes to, and whose files there are the action's. */
export interface WritableArea {
  dir: string;
  /**
   * Only files of this owner count: in the input root, the action's files are its slot's uid, and input files
   * (root's, hard-linked from the worker's cache) take no space of the action's. Absent: every entry counts, as
   * in an image's upper layer, where files the action modified are copied up with the image's owner.
   */
  owner?: number;
}

export interface DiskUsage {
  /** Allocated bytes (st_blocks × 512): sparse files count what they hold, not their size. */
  bytes: number;
  /** Files, directories, symlinks and other entries. */
  entries: number;
}

/** Stop counting past these (0: no bound); what was seen so far is returned. */
export interface DiskBounds {
  bytes: number;
  entries: number;
}

/**
 * What the action's areas hold on disk. The walk is GNU find's (fts, with
 * descriptors rather than paths: trees deeper than PATH_MAX and directories
 * of millions of entries cost it no more than others), in a child process so
 * the worker's event loop only adds up one number per entry; symlinks are not
 * followed and other file systems not entered. Once the count passes
 * `bounds`, find is stopped: a tree of millions of entries is not walked to
 * its end to learn that it is too big. Entries that vanish during the walk
 * are simply not counted.
 */
export function measureDiskUsage(
  areas: readonly WritableArea[],
  bounds: DiskBounds,
  signal?: AbortSignal,
): Promise<DiskUsage> {
  const usage: DiskUsage = { bytes: 0, entries: 0 };
  const over = () =>
    (bounds.bytes > 0 && usage.bytes > bounds.bytes) || (bounds.entries > 0 && usage.entries > bounds.entries);
  return areas.reduce<Promise<DiskUsage>>(
    (previous, area) =>
      previous.then(async (sum) => (over() || signal?.aborted ? sum : walk(area, usage, over, signal))),
    Promise.resolve(usage),
  );
}

async function walk(
  area: WritableArea,
  usage: DiskUsage,
  over: () => boolean,
  signal?: AbortSignal,
): Promise<DiskUsage> {
  const owner = area.owner === undefined ? [] : ["-uid", String(area.owner)];
  // %b: 512-byte blocks allocated. One short line per entry.
  const args = ["-P", area.dir, "-xdev", ...owner, "-printf", "%b\\n"];
  await findLines(
    args,
    `measure the disk use of ${area.dir}`,
    (line) => {
      usage.bytes += Number(line) * 512;
      usage.entries += 1;
      return over();
    },
    signal,
  );
  return usage;
}
