import { mkdir, rename, rm } from "node:fs/promises";
import { join, posix } from "node:path";
import { PinnedLru } from "../cache/pinned-lru.js";
import { QemuVm } from "./qemu-vm.js";
import type { StartedVm, VmSession, VmStarter } from "./vm-runner.js";
import { diskUsage, fileId } from "./vm-snapshots.js";

export interface WarmVmSnapshotsOptions {
  /** Where they are kept (emptied at open: a snapshot is its worker process's, like the warm VM it was). */
  dir: string;
  /** Least recently saved ones go while they add up to more (worker.vm.snapshotsMaxSizeBytes). */
  maxBytes: number;
  onError?: (err: unknown) => void;
}

interface Saved {
  dir: string;
  /** The root disk the VM read (path, inode, size, time): a VM resumes only on the very same file. */
  rootDisk: string;
  /** How its Docker daemon ran (VmUsed.dockerd). */
  prepared: string | undefined;
}

const MEMORY = "memory";
const SCRATCH = "scratch.img";

/**
 * Warm VMs that left the pool (idle too long, or pushed out by its caps) are
 * saved here rather than stopped: the whole machine (its processes, a Docker
 * daemon and the images it pulled, its memory and scratch disk), under the
 * pool's key, which only actions of the same key (instance, caller, image,
 * whole platform) ever reach. The next action of that key resumes it, once:
 * the VM then goes on from where it was, and is saved again when it leaves.
 */
export class WarmVmSnapshots {
  private readonly lru: PinnedLru<string, Saved>;

  private constructor(private readonly options: WarmVmSnapshotsOptions) {
    this.lru = new PinnedLru<string, Saved>({
      maxBytes: options.maxBytes,
      dispose: (_key, saved) => rm(saved.dir, { recursive: true, force: true }),
      onError: options.onError,
    });
  }

  static async open(options: WarmVmSnapshotsOptions): Promise<WarmVmSnapshots> {
    await rm(options.dir, { recursive: true, force: true });
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    return new WarmVmSnapshots(options);
  }

  /**
   * Saves the session's VM under `poolKey` and stops it; false when it cannot be saved (its share stays busy, a
   * migration fails): the caller then stops it as usual. `shareTarget` is where the guest mounted the workspace.
   */
  async save(poolKey: string, session: VmSession, shareTarget: string, rootDisk: string): Promise<boolean> {
    const vm = session.vm;
    if (!vm?.running || !/^[0-9a-f]{64}$/.test(poolKey)) return false;
    // A mounted 9p share blocks a migration; the next action's workspace is mounted afresh after the resume.
    const unmounted = await vm.run(
      {
        argv: ["/bin/umount", posix.join("/newroot", shareTarget)],
        env: { PATH: "/bin" },
        workingDirectory: "/",
        uid: 0,
        gid: 0,
      },
      { inAgentRoot: true, timeoutMs: 30_000 },
    );
    if (unmounted.exitCode !== 0) return false;
    const partial = join(this.options.dir, `${poolKey}.partial`);
    await rm(partial, { recursive: true, force: true });
    await mkdir(partial, { mode: 0o700 });
    try {
      await vm.snapshot(join(partial, MEMORY));
      await vm.kill();
      await rename(join(session.runDir, SCRATCH), join(partial, SCRATCH));
      const dir = join(this.options.dir, poolKey);
      await this.lru.delete(poolKey);
      await this.lru.settled(poolKey);
      await rename(partial, dir);
      await this.lru.insert(
        poolKey,
        { dir, rootDisk: await fileId(rootDisk), prepared: session.dockerd },
        await diskUsage(dir),
      );
      return true;
    } catch (error) {
      await rm(partial, { recursive: true, force: true });
      throw error;
    }
  }

  /**
   * A starter that resumes the VM saved under `poolKey` (consuming it), or `fallback`'s start when there is none
   * or it was saved on another root disk file.
   */
  starter(poolKey: string, fallback: VmStarter): VmStarter {
    return {
      start: async (options, shape): Promise<StartedVm> => {
        const lease = this.lru.tryAcquire(poolKey);
        if (!lease) return fallback.start(options, shape);
        try {
          const saved = lease.value;
          if (saved.rootDisk !== (await fileId(options.rootDisk))) return fallback.start(options, shape);
          await rename(join(saved.dir, SCRATCH), options.scratchDisk);
          const vm = await QemuVm.start({ ...options, resumeFrom: join(saved.dir, MEMORY) });
          return { vm, start: "recycled snapshot", prepared: saved.prepared };
        } finally {
          // Used once, whatever happened: its scratch disk is the resumed VM's now.
          await lease.discard();
        }
      },
    };
  }

  close(): Promise<void> {
    return this.lru.close();
  }
}
