import type { ActionRoot } from "./action-root.js";
import type { LimitName } from "./limits.js";

/**
 * Runs one build action's command in isolation (REAPI v2 worker semantics).
 *
 * What the caller must prepare, because the command runs as an unprivileged host user (65534 by default):
 * - every ancestor directory of `inputRoot` is searchable (x) by that user;
 * - every directory in the input root is writable by that user (owned by it, or mode 0777), so the action can
 *   create its outputs anywhere in the tree;
 * - input files stay owned by root and writable by no one else (0444 or 0644; 0555 or 0755 for executables):
 *   the action can read and run them but can neither modify nor chmod them, which protects files hard-linked
 *   from the worker's cache.
 */
export interface SandboxRequest {
  /** Absolute host path of the action's input root (already materialized); the action may write in it. */
  inputRoot: string;
  /** Relative to the input root; "" is the input root itself. It must exist and stay inside the input root. */
  workingDirectory: string;
  /** argv[0] is resolved via PATH from `env` when it has no slash (REAPI 2.3 semantics), else relative to the working directory. */
  argv: string[];
  /**
   * Exactly the environment the action gets, in order; nothing of the worker's own environment leaks in.
   * The one exception: PWD is always set (by bubblewrap) to the working directory's absolute path.
   */
  env: { name: string; value: string }[];
  /** Wall-clock limit; 0 or Infinity means none. */
  timeoutMs: number;
  /**
   * Host files that receive the command's stdout and stderr (created/truncated by the sandbox, as the action's
   * user's, so that it may reopen them by name: `> /dev/stderr`; outside the input root).
   */
  stdoutPath: string;
  stderrPath: string;
  /** Allow network access (default false: a private network namespace with only its own loopback). */
  network?: boolean;
  /** Aborting it kills the action (cancellation). */
  signal?: AbortSignal;
  /** What the action sees as "/" (see action-root.ts); the host's root, read-only, when absent. */
  root?: ActionRoot;
  /**
   * The user and group ids the action has inside its user namespace (what `id` says, what owns the files it
   * makes as it sees them); nobody (65534) when absent. On the host it is always the slot's unprivileged uid.
   */
  user?: SandboxUser;
}

export interface SandboxUser {
  uid: number;
  gid: number;
}

export interface SandboxResult {
  /**
   * The command's exit code; for a command killed by a signal, 128 + the signal number (137 after a timeout or
   * cancellation); 127 when argv[0] could not be executed (the reason is in the stderr file).
   */
  exitCode: number;
  timedOut: boolean;
  cancelled: boolean;
  /** A failed command that ran into one of the sandbox's limits: which, and a sentence naming its setting. */
  limitReached?: { limit: LimitName; message: string };
  startedAt: Date;
  completedAt: Date;
}

/**
 * `run` resolves once the command has ended and no process it started is left. It rejects only when the sandbox
 * itself fails (sandboxing tool missing, sandbox setup failed, invalid request), never because of the command.
 */
export interface Sandbox {
  run(request: SandboxRequest): Promise<SandboxResult>;
}
