import { relative } from "node:path";
import { invalidArgument, StatusError, toStatusError } from "../status/status.js";

/**
 * The status of an action that failed before or after it ran. The server
 * refuses input trees and commands that cannot be laid out, but a worker
 * with a longer work directory (or a tree that slipped through) can still
 * meet ENAMETOOLONG: that is the action's fault, INVALID_ARGUMENT naming the
 * path below the action's directory, not the worker's INTERNAL.
 */
export function failureStatus(err: unknown, actionDir: string): StatusError {
  if (err instanceof StatusError) return err;
  const errno = err as NodeJS.ErrnoException & { dest?: string };
  if (errno?.code === "ENAMETOOLONG") {
    const path = typeof errno.dest === "string" ? errno.dest : (errno.path ?? "");
    const shown = relative(actionDir, path);
    return invalidArgument(
      `path ${shown.length > 200 ? `${shown.slice(0, 100)}…${shown.slice(-100)}` : shown}`,
      "is longer than this worker's file system allows (ENAMETOOLONG)",
    );
  }
  return toStatusError(err);
}
