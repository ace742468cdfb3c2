import type { Config } from "../config/config.js";
import { DEFAULT_FLAGFILE_LIMITS, type FlagfileLimits } from "./persistent-action.js";
import type { WorkerPoolLimits } from "./worker-pool.js";

/** The pool's and the flagfiles' limits from the worker section's persistentWorkers. */
export function persistentWorkerLimits(section: Config["worker"]["persistentWorkers"]): {
  pool: WorkerPoolLimits;
  flagfiles: FlagfileLimits;
} {
  return {
    pool: {
      maxProcessesPerKey: section.maxProcessesPerKey,
      maxProcesses: section.maxProcesses,
      idleTimeoutMs: section.idleSeconds * 1000,
      maxResponseBytes: section.maxResponseBytes,
    },
    flagfiles: { ...DEFAULT_FLAGFILE_LIMITS, maxBytes: section.maxFlagfileBytes },
  };
}
