import { join } from "node:path";
import type { Config } from "../config/config.js";
import type { Logger } from "../log/log.js";
import { probeAccelerator } from "./accelerator.js";
import { type GuestAssets, loadGuestAssets, qemuAvailable } from "./guest-assets.js";
import type { Accelerator } from "./qemu-vm.js";
import { RootDisks } from "./root-disks.js";
import { coldStarter, type VmSizing, type VmStarter } from "./vm-runner.js";
import { VmSnapshots, type VmSnapshotsOptions } from "./vm-snapshots.js";

/** What every slot's VM runner of one worker process shares. */
export interface WorkerVms {
  assets: GuestAssets;
  accelerator: Accelerator;
  qemuPath: string;
  disks: RootDisks;
  /** Resumes snapshots (worker.vm.snapshots), or boots every VM cold. */
  starter: VmStarter;
  sizing: VmSizing;
  bootTimeoutMs: number;
  close(): Promise<void>;
}

/**
 * The worker's microVMs, or undefined when it cannot run them (no QEMU, no
 * guest built in `assetsDir`): its workers then do not offer the
 * capability, and the farm refuses such actions at once. The accelerator is
 * found once, here, with a real guest when the configuration says auto.
 */
export async function openWorkerVms(
  vm: Config["worker"]["vm"],
  assetsDir: string,
  workDir: string,
  log: Logger,
  /** Ids for the QEMU that makes snapshots (the warm runners' set): never root. */
  identities?: VmSnapshotsOptions["identities"],
): Promise<WorkerVms | undefined> {
  if (!(await qemuAvailable(vm.qemuPath))) {
    log.info(`no microVMs on this worker: ${vm.qemuPath} does not start`);
    return undefined;
  }
  const assets = await loadGuestAssets(assetsDir);
  if (!assets) {
    log.info(`no microVMs on this worker: no guest in ${assetsDir} (scripts/guest-assets.sh builds it)`);
    return undefined;
  }
  const accelerator =
    vm.accelerator === "auto" ? await probeAccelerator(assets, { qemuPath: vm.qemuPath }) : vm.accelerator;
  const disks = await RootDisks.open({
    dir: join(workDir, "vm-disks"),
    maxBytes: vm.rootDisksMaxSizeBytes,
    onError: (err) => log.warn({ err }, "removing a VM root disk failed"),
  });
  const snapshots = vm.snapshots
    ? await VmSnapshots.open({
        dir: join(workDir, "vm-snapshots"),
        maxBytes: vm.snapshotsMaxSizeBytes,
        cold: coldStarter,
        identities,
        onError: (err) => log.warn({ err }, "a VM snapshot failed"),
      })
    : undefined;
  log.info(`microVMs on this worker: QEMU under ${accelerator}, guest kernel ${assets.kernelRelease}`);
  return {
    assets,
    accelerator,
    qemuPath: vm.qemuPath,
    disks,
    starter: snapshots ?? coldStarter,
    sizing: {
      memoryBytes: vm.memoryBytes,
      vcpus: vm.vcpus,
      scratchDiskBytes: vm.scratchDiskBytes,
      maxMemoryBytes: vm.maxMemoryBytes,
      maxVcpus: vm.maxVcpus,
      maxScratchDiskBytes: vm.maxScratchDiskBytes,
    },
    bootTimeoutMs: vm.bootTimeoutSeconds * 1000,
    close: async () => {
      await snapshots?.close();
      await disks.close();
    },
  };
}
