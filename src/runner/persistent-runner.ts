import { lstatSync, writeFileSync } from "node:fs";
import type { Property } from "../action/property.js";
import type { PersistentWorkerPool } from "../persistent/worker-pool.js";
import { Code, StatusError } from "../status/status.js";
import type { Runner, RunRequest, RunResult } from "./runner.js";
import { emptyWorkspace, linkTree, mergeEntries } from "./workspace.js";

/**
 * Bazel's remote persistent workers: an action with a persistentWorkerKey
 * (see persistent/persistent-action.ts) on the host's root is sent as a
 * WorkRequest to a worker process of its key, started once and kept in a
 * sandbox of its own (SandboxedWorkerLauncher). Its inputs are linked into
 * the process's input root, its outputs moved back for the worker to read,
 * its WorkResponse's output is its stderr and its exit code the action's.
 * Anything else, and a request the pool failed twice (in two processes), runs
 * in `inner` as the one-shot command Bazel's Command also is.
 */
export class PersistentWorkerRunner implements Runner {
  readonly capabilities: readonly Property[];

  constructor(
    private readonly inner: Runner,
    private readonly pool: PersistentWorkerPool,
  ) {
    this.capabilities = inner.capabilities;
  }

  async run(request: RunRequest): Promise<RunResult> {
    const spec = request.persistentWorker;
    if (!spec || request.root.kind !== "host" || request.network) return this.inner.run(request);
    const startedAt = new Date();
    try {
      const result = await this.pool.run(spec, {
        timeoutMs: request.timeoutMs > 0 ? request.timeoutMs : undefined,
        signal: request.signal,
        // The action's own input root stays as laid out: a retry in a new process, or the one-shot run, needs it.
        prepare: async (inputRoot) => {
          emptyWorkspace(inputRoot);
          const owner = lstatSync(inputRoot);
          linkTree(request.inputRoot, inputRoot, owner.uid, owner.gid);
        },
        collect: async (inputRoot) => {
          mergeEntries(inputRoot, request.inputRoot);
        },
      });
      writeFileSync(request.stdoutPath, "");
      writeFileSync(request.stderrPath, result.stderr);
      return { exitCode: result.exitCode, timedOut: false, cancelled: false, startedAt, completedAt: new Date() };
    } catch (err) {
      const ended = { exitCode: 137, startedAt, completedAt: new Date() };
      if (err instanceof StatusError && err.code === Code.DEADLINE_EXCEEDED) {
        writeFileSync(request.stdoutPath, "");
        writeFileSync(request.stderrPath, "");
        return { ...ended, timedOut: true, cancelled: false };
      }
      if (err instanceof StatusError && err.code === Code.CANCELLED) {
        return { ...ended, timedOut: false, cancelled: true };
      }
      if (err instanceof StatusError && err.code === Code.UNAVAILABLE) return this.inner.run(request);
      throw err;
    }
  }
}
