import { mkdirSync, rmSync } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import type { Property } from "../action/property.js";
import type { Launcher } from "../process/launcher.js";
import type { SlotCgroup } from "../sandbox/cgroups.js";
import type { ResidentRunResult } from "../sandbox/resident-sandbox.js";
import {
  type ResidentSettings,
  type ResidentShape,
  residentCommand,
  type StartedResident,
  shapeKey,
  startResident,
  stillWhole,
} from "./resident.js";
import type { Runner, RunRequest, RunResult } from "./runner.js";
import { moveEntries } from "./workspace.js";

/** A sandbox made ahead for an action of `shape` (see shapeKey); one of another shape runs in a fresh sandbox. */
interface Ahead extends StartedResident {
  shape: string;
  dir: string;
  stopped?: Promise<void>;
}

export interface AheadRunnerOptions {
  /** The slot's own directory for its sandboxes made ahead (emptied now). */
  dir: string;
  /** The slot's host ids and cgroup: a sandbox made ahead is the slot's next action's. */
  uid: number;
  gid: number;
  cgroup: SlotCgroup | undefined;
  /** The slot's launcher, living in its cgroup (its fresh sandboxes' too). */
  launcher?: Launcher;
  settings: ResidentSettings;
  onError?: (err: unknown) => void;
}

/**
 * A slot given no new action for this long after its last is taken as idle, and its next sandbox is made
 * then. Actions that come back to back (the next one arrives within a few milliseconds of the last one's
 * answer) run in fresh sandboxes: making one ahead between them would only compete with them for the cores,
 * and they would wait for it, since making one takes longer than a fresh sandbox's whole run.
 */
export const IDLE_BEFORE_MAKING_MS = 25;

/** The shape most actions have (Bazel's, on the host's root): the first sandbox is made ahead for it. */
const FIRST_SHAPE: ResidentShape = { root: { kind: "host" }, user: { uid: 65534, gid: 65534 }, network: false };

/**
 * One slot's sandboxes made ahead: once the slot is idle (no new action
 * for IDLE_BEFORE_MAKING_MS), a resident sandbox of the shape of the
 * slot's last action (its root, ids and network) is started and waits, its
 * input root bound while still empty. An action of that shape has its
 * inputs moved in and runs at once (one arriving while it is still being
 * started waits for it); the sandbox is used once and closed, after the
 * action when nothing of it runs on. An action of another shape, or one
 * arriving before the slot was idle, runs in `fresh`.
 * The isolation is a fresh sandbox's: same ids, cgroup, namespaces,
 * mounts and limits, and nothing of an earlier action (each is new).
 */
export class AheadRunner implements Runner {
  readonly capabilities: readonly Property[];
  private next: Promise<Ahead | undefined> | undefined;
  /** Set while the slot waits to be idle before its next sandbox is made. */
  private idleTimer: NodeJS.Timeout | undefined;
  /** Sandboxes being ended, off the actions' path. */
  private readonly discarding = new Set<Promise<void>>();
  private made = 0;
  private closed = false;

  constructor(
    private readonly fresh: Runner,
    private readonly options: AheadRunnerOptions,
  ) {
    this.capabilities = fresh.capabilities;
    rmSync(options.dir, { recursive: true, force: true });
    mkdirSync(options.dir, { recursive: true, mode: 0o700 });
    this.makeNext(FIRST_SHAPE);
  }

  async run(request: RunRequest): Promise<RunResult> {
    const shape = { root: request.root, user: request.user, network: request.network };
    // A chroot's sandbox mounts /proc, /dev and /tmp on its input root's own: they must be there when it starts.
    if (shape.root.kind === "input-root") return this.fresh.run(request);
    // Back to back with the last action: nothing is being made, and nothing will be while this one runs.
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    const ahead = await this.take(shapeKey(shape));
    if (!ahead) {
      try {
        return await this.fresh.run(request);
      } finally {
        this.makeWhenIdle(shape);
      }
    }
    let result: ResidentRunResult;
    try {
      moveEntries(request.inputRoot, ahead.workspace);
      result = await ahead.sandbox.run(residentCommand(request));
    } catch (err) {
      await this.stop(ahead);
      moveBack(ahead, request.inputRoot, this.options.onError);
      this.retire(ahead, shape);
      throw err;
    }
    const { aloneAfter, ...ran } = result;
    // As in a fresh sandbox, nothing the command started outlives it: no process writes while outputs are read,
    // which they are where the action's directory holds them. When the command left none (the agent saw
    // itself alone in the sandbox), nothing can write, and the sandbox's end (the kernel's teardown of its
    // namespaces, milliseconds) is left off the action's path; else it is awaited here.
    if (!aloneAfter) await this.stop(ahead);
    moveBack(ahead, request.inputRoot, this.options.onError);
    this.retire(ahead, shape);
    return ran;
  }

  /** Stops the sandbox waiting, if any, and waits for the used ones to end; none is made afterwards. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.idleTimer);
    const ahead = await this.next;
    this.next = undefined;
    if (ahead) void this.discard(ahead);
    await Promise.all([...this.discarding]);
  }

  /** The sandbox made ahead if it has `shape` (waiting for it to be ready); else it is stopped. */
  private async take(shape: string): Promise<Ahead | undefined> {
    const pending = this.next;
    this.next = undefined;
    const ahead = await pending;
    if (!ahead) return undefined;
    if (ahead.shape === shape && stillWhole(ahead)) return ahead;
    void this.discard(ahead);
    return undefined;
  }

  /**
   * Ends a used sandbox and removes its files off the action's path, and makes the next once the slot is
   * idle, without waiting for that end (mostly the kernel's teardown of the namespaces).
   */
  private retire(ahead: Ahead, shape: ResidentShape): void {
    void this.discard(ahead);
    this.makeWhenIdle(shape);
  }

  /** Makes the next sandbox once the slot has been idle for IDLE_BEFORE_MAKING_MS (see there). */
  private makeWhenIdle(shape: ResidentShape): void {
    if (this.next || this.closed) return;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      this.idleTimer = undefined;
      this.makeNext(shape);
    }, IDLE_BEFORE_MAKING_MS);
    this.idleTimer.unref();
  }

  /**
   * Starts the next sandbox once the action at hand has gone on: starting one spawns processes, which
   * blocks the event loop for a moment, and that moment is not the action's.
   */
  private makeNext(shape: ResidentShape): void {
    if (this.next || this.closed) return;
    this.next = (async () => {
      await new Promise((resolve) => setImmediate(resolve));
      if (this.closed) return undefined;
      const ahead = await this.start(shape);
      // Closed while it started: it is nobody's.
      if (!this.closed) return ahead;
      await this.discard(ahead);
      return undefined;
    })().catch((err: unknown) => {
      this.options.onError?.(err);
      return undefined;
    });
  }

  private async start(shape: ResidentShape): Promise<Ahead> {
    const dir = join(this.options.dir, String(this.made++));
    const started = await startResident(dir, shape, this.options, this.options.settings);
    return { ...started, shape: shapeKey(shape), dir };
  }

  /** Ends the sandbox, then removes its files (without blocking the event loop: this is off any action's path). */
  private discard(ahead: Ahead): Promise<void> {
    const discarding = (async () => {
      await this.stop(ahead);
      await rm(ahead.dir, { recursive: true, force: true }).catch((err: unknown) => this.options.onError?.(err));
    })();
    this.discarding.add(discarding);
    void discarding.finally(() => this.discarding.delete(discarding));
    return discarding;
  }

  /** Ends the sandbox and every process in it (once: its agent's pid is not signalled after its end). */
  private stop(ahead: Ahead): Promise<void> {
    ahead.stopped ??= ahead.sandbox.close().catch((err: unknown) => this.options.onError?.(err));
    return ahead.stopped;
  }
}

/** The action's files go back to its directory, discarded with it. */
function moveBack(ahead: Ahead, inputRoot: string, onError?: (err: unknown) => void): void {
  try {
    moveEntries(ahead.workspace, inputRoot);
  } catch (err) {
    onError?.(err);
  }
}
