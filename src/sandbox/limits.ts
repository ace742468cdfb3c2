import { type LaunchStep, RLIMIT } from "../process/launcher.js";
import type { SlotCgroup } from "./cgroups.js";

/** Bounds of one action, as configured in `worker.limits` (0: unbounded). */
export interface SandboxLimits {
  maxProcesses: number;
  maxMemoryBytes: number;
  tmpSizeBytes: number;
  shmSizeBytes: number;
  maxFileSizeBytes: number;
  maxOpenFiles: number;
  /** What the action keeps on disk: its own files in its input root, and its image's upper layer (disk-monitor.ts). */
  diskBytes: number;
  diskEntries: number;
}

export type LimitName = keyof SandboxLimits;

const NPROC_HEADROOM = 16;

/** The configuration's defaults, for sandboxes made without a configuration (tests, tools). */
export const DEFAULT_LIMITS: SandboxLimits = {
  maxProcesses: 4096,
  maxMemoryBytes: 8 * 1024 ** 3,
  tmpSizeBytes: 1024 ** 3,
  shmSizeBytes: 64 * 1024 ** 2,
  maxFileSizeBytes: 16 * 1024 ** 3,
  maxOpenFiles: 65536,
  diskBytes: 64 * 1024 ** 3,
  diskEntries: 4_000_000,
};

/** The highest: an action is the OOM killer's first choice. */
const ACTION_OOM_SCORE_ADJ = 1000;

/**
 * The launcher's steps that put the action inside its bounds before bwrap
 * starts: the slot's cgroup, then rlimits set while still root (the action,
 * once unprivileged, may lower them but never raise them).
 *
 * RLIMIT_NPROC counts every process of the slot's uid, in any user namespace:
 * with a uid per slot, a process bomb exhausts its own slot only, even where
 * no pids cgroup exists. Without a memory cgroup, RLIMIT_AS is the fallback:
 * it bounds each process's address space rather than the action's memory,
 * and programs reserving large address ranges (sanitizers, some JVMs) need a
 * larger value.
 */
export function limitSteps(
  limits: SandboxLimits,
  cgroup: SlotCgroup | undefined,
  where: { launcherInCgroup: boolean },
): LaunchStep[] {
  // A launcher living in the slot's cgroup forks the action into it already (see process/launcher.ts).
  const join = cgroup && !where.launcherInCgroup ? cgroup.procsFiles : [];
  const steps: LaunchStep[] = join.map((procsFile) => ({ kind: "cgroup", procsFile }));
  // When memory runs out, in the slot's cgroup or on the host, the kernel kills an action's process first,
  // never the launcher that shares the cgroup, the worker or the server.
  steps.push({ kind: "oomScoreAdj", value: ACTION_OOM_SCORE_ADJ });
  const rlimit = (resource: number, value: number): LaunchStep => ({
    kind: "rlimit",
    resource,
    soft: value,
    hard: value,
  });
  // With a pids cgroup, the rlimit is only a backstop a little above it, so that the cgroup, which counts
  // its refusals, is the one an action meets.
  const nproc = cgroup ? limits.maxProcesses + NPROC_HEADROOM : limits.maxProcesses;
  if (limits.maxProcesses > 0) steps.push(rlimit(RLIMIT.NPROC, nproc));
  if (limits.maxFileSizeBytes > 0) steps.push(rlimit(RLIMIT.FSIZE, limits.maxFileSizeBytes));
  if (limits.maxOpenFiles > 0) steps.push(rlimit(RLIMIT.NOFILE, limits.maxOpenFiles));
  if (limits.maxMemoryBytes > 0 && !cgroup?.boundsMemory) steps.push(rlimit(RLIMIT.AS, limits.maxMemoryBytes));
  // No core files: they would land in the input root, up to maxFileSizeBytes each.
  steps.push({ kind: "rlimit", resource: RLIMIT.CORE, soft: 0, hard: 0 });
  return steps;
}

/** What a person reads when an action ended at `limit`. */
export function describeLimit(limit: LimitName, limits: SandboxLimits): string {
  const key = `worker.limits.${limit}`;
  const value = limits[limit];
  switch (limit) {
    case "maxMemoryBytes":
      return `the action reached its memory limit of ${value} bytes (${key}) and was killed by the kernel`;
    case "maxProcesses":
      return `the action reached its process limit of ${value} processes and threads (${key}); a fork failed`;
    case "maxFileSizeBytes":
      return `the action tried to write a file past the file size limit of ${value} bytes (${key})`;
    case "tmpSizeBytes":
    case "shmSizeBytes":
      return (
        `the action ran out of space: its /tmp holds at most ${limits.tmpSizeBytes} bytes (worker.limits.tmpSizeBytes) ` +
        `and its /dev/shm at most ${limits.shmSizeBytes} bytes (worker.limits.shmSizeBytes)`
      );
    case "maxOpenFiles":
      return `the action reached its limit of ${value} open files per process (${key})`;
    case "diskBytes":
      return `the action wrote more than its disk limit of ${value} bytes (${key}) and was stopped`;
    case "diskEntries":
      return `the action created more than its limit of ${value} files and directories on disk (${key}) and was stopped`;
  }
}
