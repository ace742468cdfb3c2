import { createHash } from "node:crypto";
import { lstatSync } from "node:fs";
import { join } from "node:path";
import type { Property } from "../action/property.js";
import type { Lease } from "../cache/pinned-lru.js";
import { measureDiskUsage } from "../sandbox/disk-usage.js";
import { type ResidentSettings, residentCommand, shapeKey, startResident, stillWhole } from "./resident.js";
import type { RecycleRequest, Runner, RunRequest, RunResult } from "./runner.js";
import type { RunnerIdentity, WarmRunner, WarmRunnerPool } from "./warm-pool.js";
import { enterWorkspace, moveEntries } from "./workspace.js";

/** A warm runner's disk is measured once it has been idle this long. */
const DISK_MEASURE_DELAY_MS = 200;

/** Left in the working directory by an action, it keeps the action's runner from being used again. */
export const DO_NOT_RECYCLE_MARKER = ".BERTH_DO_NOT_RECYCLE";

/**
 * A runner that keeps runners (BuildBuddy's recycle-runner): an action that
 * asks for one runs in a warm runner of its key when the pool has one idle,
 * else in a new one that, after a clean run, joins the pool with what the
 * action left running, its /tmp, its writable image layer and (with
 * preserve-workspace) its files. Actions that ask for none go to `fresh`.
 *
 * The action's input root, laid out for it as for any action, is moved into
 * the runner's workspace (bound into its sandbox since it started), and its
 * outputs are read there; then the workspace is emptied (its entries moved
 * back to the action's directory, discarded with it) or, with
 * preserve-workspace, kept.
 */
export class RecyclingRunner implements Runner {
  readonly capabilities: readonly Property[];

  constructor(
    private readonly fresh: Runner,
    private readonly pool: WarmRunnerPool,
    private readonly settings: ResidentSettings,
  ) {
    this.capabilities = fresh.capabilities;
  }

  async run(request: RunRequest): Promise<RunResult> {
    const recycle = request.recycle;
    // A chroot's sandbox mounts /proc, /dev and /tmp on its input root's own, which each action brings anew.
    if (!recycle?.key || request.root.kind === "input-root") return this.fresh.run(request);
    const poolKey = poolKeyOf(recycle.key, request);
    let lease = this.pool.take(poolKey);
    if (lease && !stillWhole(lease.value)) {
      await this.pool.giveBack(lease, false);
      lease = undefined;
    }
    lease ??= await this.pool.create(poolKey, (dir, identity) => this.start(dir, identity, recycle.key, request));
    return this.runIn(lease, request, recycle);
  }

  private async runIn(lease: Lease<WarmRunner>, request: RunRequest, recycle: RecycleRequest): Promise<RunResult> {
    const runner = lease.value;
    const { workspace, identity } = runner;
    let result: RunResult;
    try {
      runner.last = enterWorkspace(workspace, request.inputRoot, recycle, identity, runner.last);
      result = await runner.sandbox.run(residentCommand(request));
    } catch (err) {
      await this.pool.giveBack(lease, false);
      throw err;
    }
    const keep = mayRecycle(result, runner.sandbox.usable, workspace, request.workingDirectory);
    let finished = false;
    return {
      ...result,
      inputRoot: workspace,
      finish: async () => {
        if (finished) return;
        finished = true;
        // What the next action must not see goes back to the action's directory, discarded with it.
        if (!recycle.preserveWorkspace) moveEntries(workspace, request.inputRoot);
        await this.pool.giveBack(lease, keep);
        if (keep) this.measureLater(runner);
      },
    };
  }

  /** A new warm runner: its workspace, its root (an overlay whose upper layer it keeps), its sandbox. */
  private async start(dir: string, identity: RunnerIdentity, runnerKey: string, request: RunRequest) {
    const started = await startResident(dir, request, identity, this.settings);
    const runner: WarmRunner = { ...started, runnerKey, dir, identity, last: undefined, diskBytes: 0 };
    return runner;
  }

  /**
   * Measures the runner's disk use (a walk of its workspace by find, a process) once it has been idle a
   * moment, off the path of the actions that follow one another in it; the pool's disk cap is checked then.
   */
  private measureLater(runner: WarmRunner): void {
    const timer = setTimeout(() => {
      if (!this.pool.isIdle(runner)) return;
      void this.diskUse(runner).then((bytes) => this.pool.measured(runner, bytes));
    }, DISK_MEASURE_DELAY_MS);
    timer.unref();
  }

  /** What the runner holds on disk: its workspace (the files of its user) and its writable layer. */
  private async diskUse(runner: WarmRunner): Promise<number> {
    const areas = [{ dir: runner.workspace, owner: runner.identity.uid }, { dir: join(runner.dir, "upper") }];
    const usage = await measureDiskUsage(areas, { bytes: 0, entries: 0 }).catch(() => ({ bytes: 0, entries: 0 }));
    return usage.bytes;
  }
}

/**
 * The pool's key: the scheduler's (which names the image as the action
 * did) and what the worker made of it: the very layers (a tag that moved
 * is another runner), the ids inside, the network.
 */
function poolKeyOf(runnerKey: string, request: RunRequest): string {
  return createHash("sha256")
    .update(JSON.stringify([runnerKey, shapeKey(request)]))
    .digest("hex");
}

/**
 * Only a clean run leaves a runner fit for the next: exit code 0, no
 * timeout, cancellation or limit reached, a runner still whole, and no
 * marker file saying otherwise in the working directory. Warm VMs decide
 * the same way (see vm/recycling-vm-runner.ts).
 */
export function mayRecycle(result: RunResult, whole: boolean, workspace: string, workingDirectory: string): boolean {
  if (result.exitCode !== 0 || result.timedOut || result.cancelled || result.limitReached) return false;
  if (!whole) return false;
  try {
    lstatSync(join(workspace, workingDirectory, DO_NOT_RECYCLE_MARKER));
    return false;
  } catch {
    return true;
  }
}
