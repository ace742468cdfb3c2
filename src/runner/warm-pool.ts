import { rm } from "node:fs/promises";
import { join } from "node:path";
import { type Lease, PinnedLru } from "../cache/pinned-lru.js";
import type { SlotCgroup } from "../sandbox/cgroups.js";
import type { ResidentSandbox } from "../sandbox/resident-sandbox.js";

/**
 * The host user and cgroup of one warm runner. Runners are not slots: an
 * idle runner keeps processes (a database a test started, say), so it gets
 * ids and a cgroup of its own, out of reach of the actions running in the
 * worker's slots and counted apart from them.
 */
export interface RunnerIdentity {
  readonly index: number;
  readonly uid: number;
  readonly gid: number;
  readonly cgroup: SlotCgroup | undefined;
}

/** A runner kept between actions of one key: its sandbox, still running, and its files. */
export interface WarmRunner {
  /** The key the scheduler knows it by (Assignment.runner_key), which workers report while it is idle. */
  readonly runnerKey: string;
  readonly sandbox: ResidentSandbox;
  /** The runner's own directory: its workspace, its writable layer, its sandbox's state. */
  readonly dir: string;
  /** Bound into the sandbox as the input root: each action's inputs are moved in, its outputs read from it. */
  readonly workspace: string;
  readonly identity: RunnerIdentity;
  /** Layers its root is made of (none on the host's root): it is not used once one of them is gone. */
  readonly layerDirs: readonly string[];
  /** What the last action had in the workspace, for preserve-workspace. */
  last: { outputs: readonly string[]; inputs: readonly string[] } | undefined;
}

export interface WarmPoolOptions {
  /** Runners' directories are made below it (emptied at start). */
  dir: string;
  /** worker.warmRunners.maxRunners: idle runners kept; 0 keeps none. */
  maxRunners: number;
  /** worker.warmRunners.maxMemoryBytes: what the idle runners' processes may hold together. */
  maxMemoryBytes: number;
  /** worker.warmRunners.maxDiskBytes: what their workspaces and writable layers may hold together. */
  maxDiskBytes: number;
  /** worker.warmRunners.idleSeconds, in milliseconds. */
  idleMillis: number;
  /** The ids and cgroup of runner `index` (0 ≤ index < maxRunners plus the runners in use at once). */
  identity(index: number): RunnerIdentity;
  /** Called when the keys of the idle runners change (for the worker to report them). */
  onIdleKeysChanged?: (keys: readonly string[]) => void;
  onError?: (err: unknown) => void;
}

/**
 * The warm runners of a worker process, least recently used first, on the
 * shared PinnedLru: a runner is taken by one action at a time (exclusive
 * lease), given back after a clean run, discarded otherwise; the caps on
 * count, memory and disk and the idle time stop the oldest idle ones.
 * Stopping a runner kills every process of its sandbox and removes its
 * files before its identity is given to another.
 */
export class WarmRunnerPool {
  private readonly lru: PinnedLru<string, WarmRunner>;
  private readonly freeIdentities: number[] = [];
  private nextIdentity = 0;
  private nextId = 0;
  private lastReported = "";

  constructor(private readonly options: WarmPoolOptions) {
    this.lru = new PinnedLru<string, WarmRunner>({
      maxEntries: options.maxRunners,
      maxBytes: options.maxDiskBytes,
      overCap: () => this.idleMemoryBytes() > options.maxMemoryBytes,
      idleMillis: options.idleMillis,
      dispose: (_key, runner) => this.stop(runner),
      onError: options.onError,
    });
  }

  /** Empties the pool's directory: runners of an earlier run are gone with their processes. */
  async open(): Promise<void> {
    await rm(this.options.dir, { recursive: true, force: true });
  }

  /** An idle runner of `poolKey`, now this caller's alone; undefined when there is none. */
  take(poolKey: string): Lease<WarmRunner> | undefined {
    for (const entry of this.lru.entries()) {
      if (entry.pinned || !entry.key.startsWith(`${poolKey}/`)) continue;
      const lease = this.lru.take(entry.key);
      if (lease) {
        this.report();
        return lease;
      }
    }
    return undefined;
  }

  /**
   * A new runner of `poolKey`, started by `start` in a directory and with an
   * identity of its own, held by the caller; it joins the idle ones when the
   * caller releases it.
   */
  async create(
    poolKey: string,
    start: (dir: string, identity: RunnerIdentity) => Promise<WarmRunner>,
  ): Promise<Lease<WarmRunner>> {
    const key = `${poolKey}/${this.nextId++}`;
    const identity = this.options.identity(this.freeIdentities.shift() ?? this.nextIdentity++);
    const dir = join(this.options.dir, String(this.nextId));
    try {
      return await this.lru.acquire(key, async () => ({ value: await start(dir, identity), size: 0 }));
    } catch (err) {
      identity.cgroup?.killAll();
      await rm(dir, { recursive: true, force: true });
      this.freeIdentities.push(identity.index);
      throw err;
    }
  }

  /**
   * Gives a runner back: kept (its disk use now `diskBytes`) after a clean
   * run, or stopped. Resolves once the pool is back under its caps.
   */
  async giveBack(lease: Lease<WarmRunner>, keep: boolean, diskBytes: number): Promise<void> {
    if (keep && this.options.maxRunners > 0) {
      await lease.resize(diskBytes);
      await lease.release();
    } else {
      await lease.discard();
    }
    this.report();
  }

  /** The scheduler keys of the idle runners, each once. */
  idleKeys(): string[] {
    const keys = new Set<string>();
    for (const entry of this.lru.entries()) if (!entry.pinned) keys.add(entry.value.runnerKey);
    return [...keys];
  }

  /** Stops every runner (held ones when they are given back). */
  async close(): Promise<void> {
    await this.lru.close();
  }

  private idleMemoryBytes(): number {
    let bytes = 0;
    for (const entry of this.lru.entries()) if (!entry.pinned) bytes += entry.value.identity.cgroup?.memoryBytes() ?? 0;
    return bytes;
  }

  private async stop(runner: WarmRunner): Promise<void> {
    try {
      await runner.sandbox.close();
      // Whatever escaped the sandbox's pid namespace into its cgroup (nothing should) goes too.
      runner.identity.cgroup?.killAll();
      await rm(runner.dir, { recursive: true, force: true });
    } finally {
      this.freeIdentities.push(runner.identity.index);
      this.report();
    }
  }

  private report(): void {
    const keys = this.idleKeys().sort();
    const joined = keys.join(",");
    if (joined === this.lastReported) return;
    this.lastReported = joined;
    this.options.onIdleKeysChanged?.(keys);
  }
}
