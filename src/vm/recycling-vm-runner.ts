import { createHash } from "node:crypto";
import { chown, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { type DisposeReason, type Lease, PinnedLru } from "../cache/pinned-lru.js";
import { mayRecycle } from "../runner/recycling-runner.js";
import type { Runner, RunRequest, RunResult } from "../runner/runner.js";
import type { RunnerIdentities, RunnerIdentity } from "../runner/warm-pool.js";
import { enterWorkspace, moveEntries, type WorkspaceContents } from "../runner/workspace.js";
import { type VmRunner, type VmSession, vmSize } from "./vm-runner.js";
import type { WarmVmSnapshots } from "./warm-vm-snapshots.js";

/** A VM kept between actions of one key: its machine (processes, memory, scratch disk) and its workspace. */
interface WarmVm {
  session: VmSession;
  /** Where the guest mounted the workspace (the image's input root path). */
  shareTarget: string;
  /** Given back after a clean run: worth saving when it leaves the pool (never after a failed one). */
  reusable: boolean;
  /** The host directory shared into the VM as its input root; each action's inputs are moved in. */
  workspace: string;
  dir: string;
  identity: RunnerIdentity;
  last: WorkspaceContents | undefined;
}

export interface WarmVmsOptions {
  /** Warm VMs' directories are made below it (emptied at start). */
  dir: string;
  /** worker.warmRunners.maxRunners: idle VMs kept (with the warm sandboxes' own count, not against it). */
  maxRunners: number;
  /** worker.warmRunners.maxMemoryBytes: the idle VMs' memory together. */
  maxMemoryBytes: number;
  idleMillis: number;
  /** Each warm VM's QEMU runs as ids of its own, never a slot's or another runner's. */
  identities: RunnerIdentities;
  /** Warm VMs leaving the pool (idle, caps) are saved there and resumed by their key's next action; else stopped. */
  saved?: WarmVmSnapshots;
  onError?: (err: unknown) => void;
}

/** The idle VMs of a worker process, least recently used first, each taken by one action at a time. */
export class WarmVms {
  private readonly lru: PinnedLru<string, WarmVm>;
  private nextId = 0;

  constructor(
    private readonly runner: VmRunner,
    private readonly options: WarmVmsOptions,
  ) {
    this.lru = new PinnedLru<string, WarmVm>({
      maxEntries: options.maxRunners,
      overCap: () => this.idleMemory() > options.maxMemoryBytes,
      idleMillis: options.idleMillis,
      dispose: (key, warm, _size, reason) => this.stop(key, warm, reason),
      onError: options.onError,
    });
  }

  async open(): Promise<void> {
    await rm(this.options.dir, { recursive: true, force: true });
    await mkdir(this.options.dir, { recursive: true, mode: 0o700 });
  }

  take(poolKey: string): Lease<WarmVm> | undefined {
    for (const entry of this.lru.entries()) {
      if (entry.pinned || !entry.key.startsWith(`${poolKey}/`)) continue;
      const lease = this.lru.take(entry.key);
      if (lease) return lease;
    }
    return undefined;
  }

  /** A new warm VM for `request`, held by the caller. */
  async create(poolKey: string, request: RunRequest): Promise<Lease<WarmVm>> {
    const id = this.nextId++;
    const identity = this.options.identities.acquire();
    const dir = join(this.options.dir, String(id));
    const workspace = join(dir, "workspace");
    try {
      await mkdir(workspace, { recursive: true, mode: 0o755 });
      await chown(workspace, identity.uid, identity.gid);
      const saved = this.options.saved;
      return await this.lru.acquire(`${poolKey}/${id}`, async () => {
        const session = await this.runner.start(request, {
          runDir: join(dir, "vm"),
          share: workspace,
          identity,
          starter: saved && ((fallback) => saved.starter(poolKey, fallback)),
        });
        const shareTarget = request.root.kind === "layers" ? request.root.inputRootPath : "";
        return {
          value: { session, shareTarget, reusable: false, workspace, dir, identity, last: undefined },
          size: 0,
        };
      });
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      this.options.identities.release(identity);
      throw err;
    }
  }

  async giveBack(lease: Lease<WarmVm>, keep: boolean): Promise<void> {
    lease.value.reusable = keep;
    if (keep && this.options.maxRunners > 0) await lease.release();
    else await lease.discard();
  }

  close(): Promise<void> {
    return this.lru.close();
  }

  private idleMemory(): number {
    let sum = 0;
    for (const entry of this.lru.entries()) if (!entry.pinned) sum += entry.value.session.size.memoryBytes;
    return sum;
  }

  private async stop(key: string, warm: WarmVm, reason: DisposeReason): Promise<void> {
    try {
      // Pushed out or idle, after a clean run: saved for its key's next action (deleted: a failure, or the end).
      if (reason !== "deleted" && warm.reusable && this.options.saved) {
        const poolKey = key.slice(0, key.indexOf("/"));
        await this.options.saved
          .save(poolKey, warm.session, warm.shareTarget, warm.session.disk.path)
          .catch((err: unknown) => this.options.onError?.(err));
      }
      await this.runner.stop(warm.session);
      await rm(warm.dir, { recursive: true, force: true });
    } finally {
      this.options.identities.release(warm.identity);
    }
  }
}

/**
 * recycle-runner for microVMs: after a clean run the VM is kept, with the
 * processes the action left, its memory and its scratch disk, and the next
 * action of the same key (the scheduler's: instance, caller, image, whole
 * platform; here also the layers, the size and the ids inside) runs in it.
 * Its inputs are moved into the VM's workspace (the share it mounted once)
 * and its outputs read there, as for warm sandboxes. Not reused after a
 * failed, timed-out or cancelled action, a limit, or the marker file; an
 * action with a network always gets a fresh VM.
 */
export class RecyclingVmRunner implements Runner {
  readonly capabilities: Runner["capabilities"];

  constructor(
    private readonly fresh: VmRunner,
    private readonly pool: WarmVms,
  ) {
    this.capabilities = fresh.capabilities;
  }

  async run(request: RunRequest): Promise<RunResult> {
    const recycle = request.recycle;
    if (!recycle?.key || request.network || request.root.kind !== "layers") return this.fresh.run(request);
    const poolKey = createHash("sha256")
      .update(
        JSON.stringify([
          recycle.key,
          request.root.layerDirs,
          request.root.inputRootPath,
          vmSize(request.resources, this.fresh.sizing),
          request.user,
        ]),
      )
      .digest("hex");
    const lease = this.pool.take(poolKey) ?? (await this.pool.create(poolKey, request));
    const warm = lease.value;
    let result: RunResult;
    try {
      warm.last = enterWorkspace(warm.workspace, request.inputRoot, recycle, warm.identity, warm.last);
      result = await this.fresh.execute(warm.session, { ...request, inputRoot: warm.workspace });
      warm.session.start = "recycled";
    } catch (err) {
      await this.pool.giveBack(lease, false);
      throw err;
    }
    const keep = mayRecycle(result, warm.session.vm?.running ?? false, warm.workspace, request.workingDirectory);
    let finished = false;
    return {
      ...result,
      inputRoot: warm.workspace,
      finish: async () => {
        if (finished) return;
        finished = true;
        // What the next action must not see goes back to the action's directory, discarded with it.
        if (!recycle.preserveWorkspace) moveEntries(warm.workspace, request.inputRoot);
        await this.pool.giveBack(lease, keep);
      },
    };
  }
}
