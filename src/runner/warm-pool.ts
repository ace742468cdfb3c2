import { rm } from "node:fs/promises";
import { join } from "node:path";
import { type Lease, PinnedLru } from "../cache/pinned-lru.js";
import type { SlotCgroup } from "../sandbox/cgroups.js";
import type { StartedResident } from "./resident.js";

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

/**
 * A runner kept between actions of one key: its sandbox, still running, and its files. Each action's inputs
 * are moved into its workspace and its outputs read there.
 */
export interface WarmRunner extends StartedResident {
  /** The key the scheduler knows it by (Assignment.runner_key), which workers report while it is idle. */
  readonly runnerKey: string;
  /** The runner's own directory: its workspace, its writable layer, its sandbox's state. */
  readonly dir: string;
  readonly identity: RunnerIdentity;
  /** What the last action had in the workspace, for preserve-workspace. */
  last: { outputs: readonly string[]; inputs: readonly string[] } | undefined;
  /** What its workspace and writable layer held when last measured (after its last action). */
  diskBytes: number;
}

/**
 * The identities runners take (warm runners, persistent workers' sandboxes),
 * made once each by `make` and given to one runner at a time.
 */
export class RunnerIdentities {
  private readonly made: RunnerIdentity[] = [];
  private readonly free: RunnerIdentity[] = [];

  constructor(private readonly make: (index: number) => RunnerIdentity) {}

  acquire(): RunnerIdentity {
    const free = this.free.shift();
    if (free) return free;
    const identity = this.make(this.made.length);
    this.made.push(identity);
    return identity;
  }

  /** Given back once nothing of its runner is left (its processes killed, its files removed). */
  release(identity: RunnerIdentity): void {
    this.free.push(identity);
  }
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
  /** Where runners get their ids and cgroups. */
  identities: RunnerIdentities;
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
  private nextId = 0;
  private lastReported = "";

  constructor(private readonly options: WarmPoolOptions) {
    this.lru = new PinnedLru<string, WarmRunner>({
      maxEntries: options.maxRunners,
      overCap: () =>
        this.idleSum((r) => r.identity.cgroup?.memoryBytes() ?? 0) > options.maxMemoryBytes ||
        this.idleSum((r) => r.diskBytes) > options.maxDiskBytes,
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
    const identity = this.options.identities.acquire();
    const dir = join(this.options.dir, String(this.nextId));
    try {
      return await this.lru.acquire(key, async () => ({ value: await start(dir, identity), size: 0 }));
    } catch (err) {
      identity.cgroup?.killAll();
      await rm(dir, { recursive: true, force: true });
      this.options.identities.release(identity);
      throw err;
    }
  }

  /**
   * Gives a runner back: kept after a clean run, or stopped. Resolves once
   * the pool is back under its caps.
   */
  async giveBack(lease: Lease<WarmRunner>, keep: boolean): Promise<void> {
    if (keep && this.options.maxRunners > 0) await lease.release();
    else await lease.discard();
    this.report();
  }

  /** A runner's disk use changed (measured after it was given back): the caps are checked again. */
  async measured(runner: WarmRunner, diskBytes: number): Promise<void> {
    runner.diskBytes = diskBytes;
    await this.lru.enforceCaps();
    this.report();
  }

  /** Whether `runner` is in the pool and no action holds it. */
  isIdle(runner: WarmRunner): boolean {
    for (const entry of this.lru.entries()) if (entry.value === runner) return !entry.pinned;
    return false;
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

  /** `measure` summed over the idle runners. */
  private idleSum(measure: (runner: WarmRunner) => number): number {
    let sum = 0;
    for (const entry of this.lru.entries()) if (!entry.pinned) sum += measure(entry.value);
    return sum;
  }

  private async stop(runner: WarmRunner): Promise<void> {
    try {
      await runner.sandbox.close();
      // Whatever escaped the sandbox's pid namespace into its cgroup (nothing should) goes too.
      runner.identity.cgroup?.killAll();
      await rm(runner.dir, { recursive: true, force: true });
    } finally {
      this.options.identities.release(runner.identity);
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
