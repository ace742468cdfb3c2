import { mkdir, rm, writeFile } from "node:fs/promises";
import { join, posix } from "node:path";
import type { ResourceEstimates } from "../action/resource-estimates.js";
import { MICRO_VM_CAPABILITY } from "../action/workload-isolation.js";
import { VmUsed } from "../gen/berth/vm/v1/vm.js";
import type { Any } from "../gen/google/protobuf/any.js";
import type { LayeredRunRoot, Runner, RunRequest, RunResult } from "../runner/runner.js";
import { Code, StatusError } from "../status/status.js";
import type { GuestCommandResult } from "./agent-connection.js";
import { createScratchDisk } from "./disk-image.js";
import type { GuestAssets } from "./guest-assets.js";
import {
  type DockerdPlan,
  type DockerdSettings,
  dockerdPlan,
  imageHasDockerd,
  noDockerd,
  startGuestDockerd,
  writeGuestDockerAuth,
} from "./guest-dockerd.js";
import { type Accelerator, QemuVm, type QemuVmOptions } from "./qemu-vm.js";
import { openRegistryForwards, type RegistryForwards } from "./registry-forwards.js";
import type { RootDiskLease, RootDisks } from "./root-disks.js";
import { configureGuestNetwork, NO_VM_NETWORK, openVmNetwork, type VmNetwork } from "./vm-network.js";

/** A VM's size: what an action gets when it estimates nothing, and the most it gets when it does. */
export interface VmSizing {
  memoryBytes: number;
  vcpus: number;
  scratchDiskBytes: number;
  maxMemoryBytes: number;
  maxVcpus: number;
  maxScratchDiskBytes: number;
}

export interface VmSize {
  memoryBytes: number;
  vcpus: number;
  scratchDiskBytes: number;
}

const MIN_MEMORY_BYTES = 128 * 1024 ** 2;
const MIN_SCRATCH_DISK_BYTES = 64 * 1024 ** 2;

/** EstimatedCPU/EstimatedMemory/EstimatedFreeDiskBytes, within the sizing's bounds; the defaults where absent. */
export function vmSize(estimates: ResourceEstimates | undefined, sizing: VmSizing): VmSize {
  const within = (value: number, min: number, max: number) => Math.min(Math.max(value, min), max);
  return {
    vcpus: within(
      estimates?.cpuMillis === undefined ? sizing.vcpus : Math.ceil(estimates.cpuMillis / 1000),
      1,
      sizing.maxVcpus,
    ),
    memoryBytes: within(estimates?.memoryBytes ?? sizing.memoryBytes, MIN_MEMORY_BYTES, sizing.maxMemoryBytes),
    scratchDiskBytes: within(
      estimates?.freeDiskBytes ?? sizing.scratchDiskBytes,
      MIN_SCRATCH_DISK_BYTES,
      sizing.maxScratchDiskBytes,
    ),
  };
}

/** What a VM is started on: its root disk and its size (with the guest and QEMU, a snapshot's whole key). */
export interface VmShape {
  diskKey: string;
  size: VmSize;
  /**
   * What every VM of the shape runs before its first action (a Docker daemon), the same for all of them: a
   * snapshot is taken after it, so a resumed VM has it done. Resolves to what it tells the client (VmUsed).
   */
  prepare?: { key: string; run(vm: QemuVm): Promise<string> };
}

/** A started VM; `prepared` is what the shape's prepare said when the VM was resumed with it done. */
export interface StartedVm {
  vm: QemuVm;
  start: string;
  prepared?: string;
}

/**
 * Starts a VM up to an answering agent: a cold boot, or a resume of a
 * snapshot (VmSnapshots). It makes the scratch disk at `options.scratchDisk`.
 */
export interface VmStarter {
  start(options: QemuVmOptions, shape: VmShape): Promise<StartedVm>;
}

export interface VmRunnerOptions {
  assets: GuestAssets;
  accelerator: Accelerator;
  qemuPath?: string;
  disks: RootDisks;
  sizing: VmSizing;
  starter: VmStarter;
  /** The host ids QEMU runs as (the slot's own): what the action's writes to its input root are owned by. */
  identity: { uid: number; gid: number };
  bootTimeoutMs: number;
  /** For network=external actions (worker.slirp4netnsPath); default "slirp4netns". */
  slirp4netnsPath?: string;
  /** Docker daemons in VMs (init-dockerd=true); default: 120 s to start, no registry but the image's. */
  dockerd?: DockerdSettings;
}

/** A started VM and what it holds (VmRunner.start), until VmRunner.stop. */
export interface VmSession {
  vm: QemuVm | undefined;
  runDir: string;
  network: VmNetwork;
  disk: RootDiskLease;
  size: VmSize;
  /** How the VM started: cold, snapshot (then recycled, once kept). */
  start: string;
  /** The worker's forwards of the registries a Docker daemon in the VM reaches. */
  forwards?: RegistryForwards;
  /** How the VM's Docker daemon runs (init-dockerd), as VmUsed says it. */
  dockerd?: string;
}

const DEFAULT_DOCKERD: DockerdSettings = { startTimeoutMs: 120_000, insecureRegistries: [], registryMirrors: [] };

/** The 9p tag under which the guest finds the action's input root. */
export const INPUT_SHARE_TAG = "berth-inputs";

/**
 * Runs each action in a QEMU virtual machine of its own, booted (or resumed
 * from a snapshot) on the action's image: the image's layers as a read-only
 * erofs disk (RootDisks), a fresh writable scratch disk over it (an overlay
 * in the guest), the input root shared in by 9p, where the command's
 * outputs are written and read back by the worker as for any runner. QEMU
 * runs as the slot's own host ids, so what the guest writes through the
 * share is owned by them and can be nothing they could not make. The VM is
 * killed when the command ends, times out or is cancelled.
 */
export class VmRunner implements Runner {
  readonly capabilities = [MICRO_VM_CAPABILITY];

  constructor(private readonly options: VmRunnerOptions) {}

  get sizing(): VmSizing {
    return this.options.sizing;
  }

  async run(request: RunRequest): Promise<RunResult> {
    const session = await this.start(request, {
      runDir: join(request.scratchDir, "vm"),
      share: request.inputRoot,
      identity: this.options.identity,
    });
    try {
      return await this.execute(session, request);
    } finally {
      // Nothing the action started outlives it: its whole machine goes before its outputs are read.
      await this.stop(session);
    }
  }

  /**
   * A VM for `request`'s image and size, started (QEMU as `identity`), with the host directory `share` mounted
   * where the action sees its input root. Its files are in `runDir` (made here, removed by stop).
   */
  async start(
    request: RunRequest,
    where: {
      runDir: string;
      share: string;
      identity: { uid: number; gid: number };
      /** How to start it instead of the runner's own starter (a warm VM's saved snapshot). */
      starter?: (fallback: VmStarter) => VmStarter;
    },
  ): Promise<VmSession> {
    const { root } = request;
    if (root.kind !== "layers") {
      throw new StatusError(
        Code.FAILED_PRECONDITION,
        "a microVM boots from the action's container-image; this action has none (or runs with its input root as /)",
      );
    }
    const size = vmSize(request.resources, this.options.sizing);
    const docker = request.dockerd && dockerdPlan(this.options.dockerd ?? DEFAULT_DOCKERD, request.dockerd);
    if (request.dockerd && !(await imageHasDockerd(root.layerDirs))) throw noDockerd(request.dockerd.image);
    const disk = await this.options.disks.acquire(root.layerDirs);
    const session: VmSession = { vm: undefined, runDir: where.runDir, network: NO_VM_NETWORK, disk, size, start: "" };
    try {
      if (request.network || docker) {
        // A Docker VM always has a NIC: without a network, its namespace leads only to the registry forwards.
        session.network = await openVmNetwork({
          slirp4netnsPath: this.options.slirp4netnsPath,
          outside: request.network,
        });
      }
      if (docker) session.forwards = await openRegistryForwards(session.network.namespace as string, docker.relays);
      await mkdir(where.runDir, { mode: 0o700 });
      // A snapshot's VM has no way out: one with a network boots cold.
      const starter = request.network ? coldStarter : (where.starter?.(this.options.starter) ?? this.options.starter);
      const started = await starter.start(
        {
          assets: this.options.assets,
          runDir: where.runDir,
          rootDisk: disk.path,
          scratchDisk: join(where.runDir, "scratch.img"),
          accelerator: this.options.accelerator,
          memoryBytes: size.memoryBytes,
          vcpus: size.vcpus,
          qemuPath: this.options.qemuPath,
          bootTimeoutMs: this.options.bootTimeoutMs,
          share: { path: where.share, tag: INPUT_SHARE_TAG },
          runAs: where.identity,
          ...session.network.launch,
        },
        { diskKey: disk.key, size, prepare: docker && dockerPreparation(docker, request.dockerd?.image ?? "") },
      );
      session.vm = started.vm;
      session.start = started.start;
      if (started.start !== "cold") {
        // The network's setup and the daemon are in the snapshot.
        session.dockerd = started.prepared;
      } else {
        await session.network.configure(started.vm);
        if (docker) session.dockerd = await startGuestDockerd(started.vm, docker, request.dockerd?.image ?? "");
      }
      if (request.dockerd?.auth) await writeGuestDockerAuth(started.vm, request.dockerd.auth);
      // The input root where the image has it; directories whose mode the layer store tamed get it back (in the
      // VM's own writable layer), as in mount mode.
      await started.vm.mount(root.inputRootPath, root.upperDirectories);
      return session;
    } catch (error) {
      await this.stop(session);
      throw error;
    }
  }

  /** Runs the action's command in the session's VM, its input root already in the VM's share. */
  async execute(session: VmSession, request: RunRequest): Promise<RunResult> {
    const vm = session.vm as QemuVm;
    const used = [this.used(vm, session)];
    const startedAt = new Date();
    let result: GuestCommandResult;
    try {
      result = await this.runCommand(vm, request, request.root as LayeredRunRoot);
    } catch (error) {
      // The agent's refusals: a command that could not start (127, as elsewhere), or past the output limit.
      if (!(error instanceof StatusError)) throw error;
      await writeFile(request.stdoutPath, "");
      await writeFile(request.stderrPath, `${error.message}\n`);
      const exhausted = error.code === Code.RESOURCE_EXHAUSTED;
      return {
        exitCode: exhausted ? 137 : 127,
        timedOut: false,
        cancelled: false,
        limitReached: exhausted ? { limit: "output", message: error.message } : undefined,
        startedAt,
        completedAt: new Date(),
        auxiliaryMetadata: used,
      };
    }
    const completedAt = new Date();
    await writeFile(request.stdoutPath, result.stdout);
    await writeFile(request.stderrPath, result.stderr);
    return {
      exitCode: result.signal > 0 ? 128 + result.signal : result.exitCode,
      timedOut: result.timedOut,
      cancelled: result.cancelled,
      startedAt,
      completedAt,
      auxiliaryMetadata: used,
    };
  }

  /** Kills the VM and removes what it had: its network, its run directory, its hold on the root disk. */
  async stop(session: VmSession): Promise<void> {
    await session.vm?.kill();
    await session.forwards?.close();
    await session.network.close();
    await rm(session.runDir, { recursive: true, force: true });
    await session.disk.release();
  }

  private runCommand(vm: QemuVm, request: RunRequest, root: LayeredRunRoot): Promise<GuestCommandResult> {
    const env: Record<string, string> = {};
    for (const { name, value } of request.env) env[name] = value;
    return vm.run(
      {
        argv: request.argv,
        env,
        workingDirectory: posix.join(root.inputRootPath, request.workingDirectory),
        uid: request.user.uid,
        gid: request.user.gid,
      },
      { timeoutMs: request.timeoutMs, signal: request.signal },
    );
  }

  private used(vm: QemuVm, session: VmSession): Any {
    const value = VmUsed.encode({
      accelerator: this.options.accelerator,
      kernelRelease: vm.kernelRelease,
      vcpus: session.size.vcpus,
      memoryBytes: session.size.memoryBytes,
      scratchDiskBytes: session.size.scratchDiskBytes,
      start: session.start,
      dockerd: session.dockerd ?? "",
    }).finish();
    return { typeUrl: "type.googleapis.com/berth.vm.v1.VmUsed", value: Buffer.from(value) };
  }
}

/** A snapshot of a Docker VM is taken with its network set up and its daemon answering (never its credentials). */
function dockerPreparation(plan: DockerdPlan, image: string): NonNullable<VmShape["prepare"]> {
  return {
    key: plan.key,
    run: async (vm) => {
      await configureGuestNetwork(vm);
      return startGuestDockerd(vm, plan, image);
    },
  };
}

/** Boots every VM cold, on a fresh scratch disk. */
export const coldStarter: VmStarter = {
  start: async (options, shape) => {
    await createScratchDisk(options.scratchDisk, shape.size.scratchDiskBytes);
    return { vm: await QemuVm.start(options), start: "cold" };
  },
};
