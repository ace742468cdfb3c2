import { readdir, readFile, stat } from "node:fs/promises";
import type { DiskUsage } from "./disk-usage.js";
import { findLines } from "./find-lines.js";

/** The host pids of an action's processes, as the monitor samples them. */
export type ProcessLister = () => Promise<readonly number[]>;

/** The processes listed in a cgroup's `cgroup.procs` (host pids); none once it is gone. */
export function cgroupProcesses(procsFile: string): ProcessLister {
  return async () => parsePids(await readFile(procsFile, "utf8").catch(() => ""));
}

/**
 * Without a cgroup: every process whose real or effective uid is the slot's.
 * A slot's uid is its own (worker.sandboxUidBase + slot), so these are the
 * running action's processes; /proc/PID's owner is not used, as a
 * non-dumpable process shows there as root's.
 */
export function uidProcesses(uid: number): ProcessLister {
  return async () => {
    const entries = await readdir("/proc").catch(() => [] as string[]);
    const pids = await Promise.all(
      entries
        .filter((entry) => /^\d+$/.test(entry))
        .map(async (entry) => {
          const status = await readFile(`/proc/${entry}/status`, "utf8").catch(() => "");
          // "Uid:\treal\teffective\tsaved\tfs"
          const ids = /^Uid:\s+(\d+)\s+(\d+)/m.exec(status);
          return ids && (Number(ids[1]) === uid || Number(ids[2]) === uid) ? Number(entry) : undefined;
        }),
    );
    return pids.filter((pid): pid is number => pid !== undefined);
  };
}

function parsePids(text: string): number[] {
  return text
    .split("\n")
    .filter((line) => /^\d+$/.test(line))
    .map(Number);
}

/**
 * What regular files the processes hold open after they were deleted take on
 * the file systems of `dirs` (the action's areas): the walk of the areas sees
 * names only, and `exec 3>big; rm big; cat /dev/zero >&3` has none. Each
 * inode counts once (dev + inode), whichever process or descriptor holds it,
 * as allocated blocks. Only files on the areas' file systems and on the
 * action's root (an image's overlay) count: /tmp and /dev/shm are tmpfs of
 * bounded size, pipes and memfds are memory.
 *
 * A deleted file is one with no link left (st_nlink 0), read through the
 * target of /proc/PID/fd/N, which stat follows to the open inode even
 * without a name. GNU find does the readdir and the stats in a child process
 * (`-L` follows the descriptors' links, depth 1 stays in fd/), so a process
 * with 65,536 descriptors costs the worker's event loop one short line per
 * deleted file only. Processes that end meanwhile are skipped.
 */
export async function measureOpenDeletedFiles(
  pids: readonly number[],
  dirs: readonly string[],
  signal?: AbortSignal,
): Promise<DiskUsage> {
  const usage: DiskUsage = { bytes: 0, entries: 0 };
  if (pids.length === 0 || signal?.aborted) return usage;
  // An image's upper layer is written through the overlay, whose files show the overlay's device, not the
  // upper layer's: the overlay is the action's root, so its processes' roots name that device.
  const roots = pids.map((pid) => `/proc/${pid}/root`);
  const infos = await Promise.all([...dirs, ...roots].map((path) => stat(path).catch(() => undefined)));
  const devices = new Set(infos.flatMap((info) => (info ? [String(info.dev)] : [])));
  const fdDirs = pids.map((pid) => `/proc/${pid}/fd`);
  const seen = new Set<string>();
  const args = [
    "-L",
    ...fdDirs,
    "-mindepth",
    "1",
    "-maxdepth",
    "1",
    "-type",
    "f",
    "-links",
    "0",
    "-printf",
    "%D %i %b\\n",
  ];
  await findLines(
    args,
    "list the action's open deleted files",
    (line) => {
      const [device, inode, blocks] = line.split(" ");
      if (device === undefined || !devices.has(device)) return;
      const key = `${device}:${inode}`;
      if (seen.has(key)) return;
      seen.add(key);
      usage.bytes += Number(blocks) * 512;
      usage.entries += 1;
    },
    signal,
  );
  return usage;
}
