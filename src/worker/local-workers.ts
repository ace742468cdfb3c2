import { readdir } from "node:fs/promises";
import { availableParallelism, endianness, hostname } from "node:os";
import { join } from "node:path";
import { EXPANDED_IMAGE_CAPABILITY, IMAGE_CAPABILITY } from "../action/action-platform.js";
import { hostPlatformProperties } from "../action/host-platform.js";
import type { Property } from "../action/property.js";
import { type ConnectionOptions, clientChannel } from "../auth/client-channel.js";
import type { InputTreeLimits } from "../cas/tree-limits.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import type { Config } from "../config/config.js";
import type { Logger } from "../log/log.js";
import { persistentWorkerLimits } from "../persistent/configured-limits.js";
import { PersistentWorkerPool } from "../persistent/worker-pool.js";
import { registryFromConfig } from "../registry/configured-client.js";
import { AheadRunner } from "../runner/ahead-runner.js";
import { BubblewrapRunner } from "../runner/bubblewrap-runner.js";
import { PersistentWorkerRunner } from "../runner/persistent-runner.js";
import { RecyclingRunner } from "../runner/recycling-runner.js";
import { Runners } from "../runner/runners.js";
import { SandboxedWorkerLauncher } from "../runner/sandboxed-worker-launcher.js";
import { RunnerIdentities, WarmRunnerPool } from "../runner/warm-pool.js";
import { BubblewrapSandbox, slotLauncher } from "../sandbox/bubblewrap.js";
import { openSlotCgroup, removeSlotCgroup, type SlotCgroup } from "../sandbox/cgroups.js";
import { openPrivateDir } from "../store/private-dir.js";
import { RecyclingVmRunner, WarmVms } from "../vm/recycling-vm-runner.js";
import { VmRunner } from "../vm/vm-runner.js";
import { WarmVmSnapshots } from "../vm/warm-vm-snapshots.js";
import { openWorkerVms } from "../vm/worker-vms.js";
import { ActionDirectories } from "./action-directories.js";
import { ActionEnvironments } from "./action-environments.js";
import type { ActionInputs } from "./action-inputs.js";
import { DirectoryCache } from "./directory-cache.js";
import { ExpandedRoots } from "./expanded-roots.js";
import { FileCache } from "./file-cache.js";
import type { TreeOwner } from "./input-root.js";
import { CHANNEL_OPTIONS, RemoteCas } from "./remote-cas.js";
import { Trash } from "./trash.js";
import { WarmKeys, Worker } from "./worker.js";
import { workerExecutor } from "./worker-executor.js";
import { WorkerImages } from "./worker-images.js";

export interface WorkerPoolOptions {
  /** The farm to join (scheduler and CAS), with the worker token every call carries. */
  connection: ConnectionOptions;
  /** How many workers, each running one action at a time. */
  count: number;
  /** Below it: the shared file cache and each action's directory. */
  workDir: string;
  properties: Property[];
  /** How to pull and where to mount images; workers not started as root run none. */
  images: Config["images"];
  /** The file cache's cap and other settings of the workers themselves. */
  worker: Config["worker"];
  /** Input trees past these are refused before anything is laid out (the defaults when absent). */
  inputLimits?: InputTreeLimits;
  /** false: run no images even as root. */
  runImages?: boolean;
  /** Prefix of the workers' names. */
  name?: string;
  /** Files holding secrets, shown empty to actions on the host root (see BubblewrapSandboxOptions). */
  maskedFiles?: readonly string[];
  /** Where the microVM guest was built (worker.vm.dir); absent: the workers run no VMs. */
  vmAssetsDir?: string;
  log: Logger;
}

/**
 * The user executor slot `slot` runs its actions as: uid and gid `uidBase + slot` when the worker can switch
 * to it (as root), else the worker's own. A uid per slot, rather than one shared `nobody`, keeps one slot's
 * processes out of another's RLIMIT_NPROC count and out of reach of its signals and ptrace.
 */
export function actionUser(slot: number, uidBase: number): TreeOwner {
  const root = process.getuid?.() === 0;
  if (!root) return { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  return { uid: uidBase + slot, gid: uidBase + slot };
}

export function defaultWorkerCount(): number {
  return availableParallelism();
}

/** Workers sharing one file cache and one connection to the CAS; `stop` ends them all. */
export async function startWorkers(options: WorkerPoolOptions): Promise<{ stop(): Promise<void> }> {
  // The file cache, layers and action directories below are the worker's (root's) alone.
  await openPrivateDir(options.workDir);
  // As root the copies are root's, and the actions run as other users: the owner's write bit harms nothing.
  const cache = await FileCache.open(join(options.workDir, "cache"), options.worker.fileCacheMaxSizeBytes, {
    ownerWrites: process.getuid?.() === 0,
  });
  const hub = clientChannel(options.connection, CHANNEL_OPTIONS);
  const cas = RemoteCas.connect(hub);
  // Mounting an image's overlay needs root; other workers run actions on the host's root only.
  const layeredRoots = process.getuid?.() === 0 && options.runImages !== false;
  const { limits, sandboxUidBase, slirp4netnsPath } = options.worker;
  let warnedNoCgroup = false;
  const cgroups: SlotCgroup[] = [];
  const cgroupLimits = { memoryBytes: limits.maxMemoryBytes, processes: limits.maxProcesses };
  // Warm runners (recycle-runner) have users and cgroups of their own, numbered after the slots'.
  const warm = options.worker.warmRunners;
  const identities = new RunnerIdentities((index) => {
    const owner = actionUser(options.count + index, sandboxUidBase);
    const cgroup = openSlotCgroup(options.count + index, cgroupLimits);
    if (cgroup) cgroups.push(cgroup);
    return { index, uid: owner.uid, gid: owner.gid, cgroup };
  });
  const pool = new WarmRunnerPool({
    dir: join(options.workDir, "runners"),
    maxRunners: warm.maxRunners,
    maxMemoryBytes: warm.maxMemoryBytes,
    maxDiskBytes: warm.maxDiskBytes,
    idleMillis: warm.idleSeconds * 1000,
    identities,
    onIdleKeysChanged: (keys) => warmKeys.publish(keys),
    onError: (err) => options.log.warn({ err }, "stopping a warm runner failed"),
  });
  await pool.open();
  const persistent = persistentWorkerLimits(options.worker.persistentWorkers);
  const sandboxSettings = { limits, slirp4netnsPath, maskedFiles: options.maskedFiles };
  // Bazel's persistent workers, each process in a sandbox of its own with an identity from the same set.
  const persistentPool = new PersistentWorkerPool(
    new SandboxedWorkerLauncher(join(options.workDir, "persistent"), identities, sandboxSettings),
    persistent.pool,
  );
  const warmKeys = new WarmKeys();
  // VMs boot from images, whose root disks are made from the layers by mounting them: as root only.
  const vms =
    layeredRoots && options.vmAssetsDir !== undefined
      ? await openWorkerVms(options.worker.vm, options.vmAssetsDir, options.workDir, options.log, identities)
      : undefined;
  // Warm VMs leaving the pool are saved (with their daemons and images) when the worker makes snapshots at all.
  const savedVms =
    vms && options.worker.vm.snapshots
      ? await WarmVmSnapshots.open({
          dir: join(options.workDir, "warm-vm-snapshots"),
          maxBytes: options.worker.vm.snapshotsMaxSizeBytes,
          onError: (err) => options.log.warn({ err }, "removing a saved warm VM failed"),
        })
      : undefined;
  /** Each slot's runners: its sandbox has the slot's user and cgroup. */
  const aheadRunners: AheadRunner[] = [];
  const slotRunners = (slot: number, owner: TreeOwner) => {
    const cgroup = openSlotCgroup(slot, cgroupLimits);
    if (cgroup) cgroups.push(cgroup);
    if (!cgroup && !warnedNoCgroup) {
      warnedNoCgroup = true;
      options.log.warn(
        "no writable cgroup with the memory and pids controllers: actions are bounded by rlimits only (RLIMIT_AS for memory)",
      );
    }
    // One launcher in the slot's cgroup starts the slot's fresh sandboxes and those made ahead alike.
    const launcher = cgroup && slotLauncher(cgroup);
    const sandbox = new BubblewrapSandbox({
      uid: owner.uid,
      gid: owner.gid,
      limits,
      cgroup,
      launcher,
      slirp4netnsPath,
      maskedFiles: options.maskedFiles,
    });
    const fresh = new BubblewrapRunner(sandbox, { layeredRoots });
    // Resident sandboxes (made ahead, warm) have roots root mounts: a worker started as another user keeps none.
    if (!layeredRoots) return new Runners({ "namespace-sandbox": fresh });
    const settings = sandboxSettings;
    const ahead = options.worker.sandboxesAhead
      ? new AheadRunner(fresh, {
          dir: join(options.workDir, "ahead", String(slot)),
          uid: owner.uid,
          gid: owner.gid,
          cgroup,
          launcher,
          settings,
          onError: (err) => options.log.warn({ err }, "a sandbox made ahead failed"),
        })
      : undefined;
    if (ahead) aheadRunners.push(ahead);
    const recycling = new RecyclingRunner(ahead ?? fresh, pool, settings);
    // QEMU runs as the slot's ids: what a guest writes through its share is the slot's, as its sandbox's writes are.
    const vmRunner =
      vms &&
      new VmRunner({
        ...vms,
        identity: owner,
        slirp4netnsPath,
        // The registries the farm pulls from over plain HTTP are the ones a Docker VM reaches (and its image's).
        dockerd: {
          startTimeoutMs: options.worker.vm.dockerd.startTimeoutSeconds * 1000,
          insecureRegistries: options.images.insecureRegistries,
          registryMirrors: options.worker.vm.dockerd.registryMirrors,
        },
      });
    // Warm VMs (recycle-runner) are the worker's, with ids of their own from the warm runners' set.
    warmVms ??=
      vmRunner &&
      new WarmVms(vmRunner, {
        dir: join(options.workDir, "warm-vms"),
        maxRunners: warm.maxRunners,
        maxMemoryBytes: warm.maxMemoryBytes,
        idleMillis: warm.idleSeconds * 1000,
        identities,
        saved: savedVms,
        onError: (err) => options.log.warn({ err }, "stopping a warm VM failed"),
      });
    const microvm = vmRunner && warmVms && new RecyclingVmRunner(vmRunner, warmVms);
    return new Runners({
      "namespace-sandbox": new PersistentWorkerRunner(recycling, persistentPool),
      ...(microvm ? { microvm } : {}),
    });
  };
  const owners = Array.from({ length: options.count }, (_, i) => actionUser(i, sandboxUidBase));
  // What a crashed worker process left of its actions goes to the trash (opened below) before any action runs.
  const actionsDir = join(options.workDir, "actions");
  const leftovers = await readdir(actionsDir).catch(() => [] as string[]);
  const actionDirectories = owners.map(
    (owner) => new ActionDirectories(actionsDir, process.getuid?.() === 0 ? owner : undefined),
  );
  let warmVms: WarmVms | undefined;
  const runners = owners.map((owner, i) => slotRunners(i, owner));
  await warmVms?.open();
  // What the runners can do decides which image stores the workers keep.
  const capabilities = runners[0]?.capabilities ?? [];
  const offers = (capability: Property) => runners[0]?.offers(capability) ?? false;
  const images = offers(IMAGE_CAPABILITY)
    ? await WorkerImages.open({
        dir: join(options.workDir, "images"),
        maxBytes: options.images.storeMaxSizeBytes,
        limits: options.images,
        registry: await registryFromConfig(options.images),
        tagRefreshMs: options.images.tagRefreshSeconds * 1000,
      })
    : undefined;
  // Images the farm expanded into the CAS need no registry, only the overlay.
  const expandedRoots = offers(EXPANDED_IMAGE_CAPABILITY)
    ? await ExpandedRoots.open(join(options.workDir, "expanded"), {
        maxBytes: options.worker.expandedRootsMaxSizeBytes,
        onError: (err) => options.log.warn({ err }, "removing an expanded image's root failed"),
      })
    : undefined;
  const properties = [
    // What every client may ask of a worker (OSFamily, ISA, Arch), unless the operator said otherwise.
    ...hostPlatformProperties(options.properties, process.platform, process.arch, endianness()),
    ...options.properties,
    ...capabilities,
  ];
  const directories = new DirectoryCache();
  const trash = await Trash.open(join(options.workDir, "trash"));
  for (const name of leftovers) void trash.discard(join(actionsDir, name)).catch(() => {});
  const prefix = options.name ?? `${hostname()}-${process.pid}`;
  const workers = owners.map((owner, i) => {
    const workerName = `${prefix}-${i}`;
    const inputs: ActionInputs = {
      cas,
      files: cache,
      directories,
      owner: process.getuid?.() === 0 ? owner : undefined,
      limits: options.inputLimits ?? DEFAULT_INPUT_TREE_LIMITS,
    };
    const inputRootPath = options.images.inputRootPath;
    const environments = new ActionEnvironments({ workerName, images, expandedRoots, inputRootPath });
    const slot = runners[i] as Runners;
    return new Worker({
      hub,
      workerName,
      properties,
      slots: 1,
      executor: workerExecutor({
        workerName,
        inputs,
        environments,
        runners: slot,
        trash,
        flagfileLimits: persistent.flagfiles,
      }),
      directories: actionDirectories[i] as ActionDirectories,
      images,
      warmKeys,
      log: options.log,
    });
  });
  for (const worker of workers) worker.start();
  return {
    stop: async () => {
      await Promise.all(workers.map((w) => w.stop()));
      await pool.close();
      await persistentPool.close();
      await Promise.all(aheadRunners.map((ahead) => ahead.close()));
      await Promise.all(actionDirectories.map((directories) => directories.close()));
      await warmVms?.close();
      await savedVms?.close();
      await vms?.close();
      for (const cgroup of cgroups) removeSlotCgroup(cgroup);
      cas.close();
      await trash.drain();
    },
  };
}
