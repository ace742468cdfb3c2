import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chown, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { PinnedLru } from "../cache/pinned-lru.js";
import { createScratchDisk } from "./disk-image.js";
import { QemuVm, type QemuVmOptions } from "./qemu-vm.js";
import type { StartedVm, VmShape, VmStarter } from "./vm-runner.js";

const run = promisify(execFile);

export interface VmSnapshotsOptions {
  /** Where the snapshots are kept (the worker's own directory). */
  dir: string;
  /** Least recently used snapshots nobody resumes go while they add up to more. */
  maxBytes: number;
  /** Starts a VM when no snapshot fits yet: a cold boot. */
  cold: VmStarter;
  /**
   * Host ids the snapshot-making QEMU runs as, one set per VM made, given back once it is gone (the warm runners'
   * set): it boots the image and may run its daemon (init-dockerd), so never as root. Absent: it runs as root.
   */
  identities?: { acquire(): { uid: number; gid: number }; release(identity: { uid: number; gid: number }): void };
  onError?: (err: unknown) => void;
}

/** A snapshot on disk: the VM's memory and devices (QEMU's migration stream) and its scratch disk as it was then. */
interface Snapshot {
  dir: string;
}

const MEMORY = "memory";
const SCRATCH = "scratch.img";
/** What the shape's prepare said in the snapshot's VM (how its Docker daemon runs). */
const PREPARED = "prepared";

/**
 * Starts VMs by resuming a snapshot of a booted, idle VM of the same shape
 * (root disk, memory, vCPUs, scratch disk size, guest, QEMU, accelerator):
 * a fraction of a second under TCG where a cold boot takes seconds. The
 * first VM of a shape boots cold, and a snapshot of that shape is made
 * beside it, by a VM of its own that never runs an action (so a snapshot
 * holds nothing of any action); the next VMs of the shape resume it, each
 * on its own copy of the snapshot's scratch disk. Snapshots are kept under a
 * byte cap, least recently used first, and never removed while resumed.
 */
export class VmSnapshots implements VmStarter {
  private readonly snapshots: PinnedLru<string, Snapshot>;
  /** Shapes whose snapshot is being made, or failed to be (not tried again by this worker). */
  private readonly making = new Map<string, Promise<void>>();
  /** One snapshot made at a time: each is a boot, seconds of CPU. */
  private queue: Promise<void> = Promise.resolve();

  private constructor(private readonly options: VmSnapshotsOptions) {
    this.snapshots = new PinnedLru<string, Snapshot>({
      maxBytes: options.maxBytes,
      dispose: (_key, snapshot) => rm(snapshot.dir, { recursive: true, force: true }),
      onError: options.onError,
    });
  }

  /** Opens the store in `dir`: snapshots a previous worker finished are kept, anything half-made is removed. */
  static async open(options: VmSnapshotsOptions): Promise<VmSnapshots> {
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    const snapshots = new VmSnapshots(options);
    const found = [];
    for (const name of await readdir(options.dir)) {
      const dir = join(options.dir, name);
      if (!/^[0-9a-f]{64}$/.test(name)) {
        await rm(dir, { recursive: true, force: true });
        continue;
      }
      const memory = await stat(join(dir, MEMORY)).catch(() => undefined);
      if (!memory) {
        await rm(dir, { recursive: true, force: true });
        continue;
      }
      found.push({ key: name, value: { dir }, size: await diskUsage(dir), usedAt: memory.mtimeMs });
    }
    await snapshots.snapshots.restore(found);
    return snapshots;
  }

  async start(options: QemuVmOptions, shape: VmShape): Promise<StartedVm> {
    const key = await snapshotKey(options, shape);
    const lease = this.snapshots.tryAcquire(key);
    if (!lease) {
      this.makeLater(key, options, shape);
      return this.options.cold.start(options, shape);
    }
    try {
      // Each resumed VM writes its own copy; the snapshot's disk stays as the snapshot's memory expects it.
      await run("cp", ["--sparse=always", join(lease.value.dir, SCRATCH), options.scratchDisk]);
      const prepared = shape.prepare && (await readFile(join(lease.value.dir, PREPARED), "utf8"));
      const vm = await QemuVm.start({ ...options, resumeFrom: join(lease.value.dir, MEMORY) });
      return { vm, start: "snapshot", prepared };
    } finally {
      // QEMU has read the whole migration stream once the agent answers.
      await lease.release();
    }
  }

  /** Resolves once the snapshot of the shape `options` has (or a failure), for tests and benchmarks. */
  async settled(options: QemuVmOptions, shape: VmShape): Promise<boolean> {
    const key = await snapshotKey(options, shape);
    await this.making.get(key)?.catch(() => {});
    return this.snapshots.has(key);
  }

  /** Nothing to stop: the snapshots stay on disk for the next worker (open() finds them). */
  async close(): Promise<void> {}

  private makeLater(key: string, options: QemuVmOptions, shape: VmShape): void {
    if (this.making.has(key)) return;
    const made = this.queue.then(() => this.make(key, options, shape));
    this.making.set(key, made);
    this.queue = made.catch((err: unknown) => this.options.onError?.(err));
  }

  private async make(key: string, options: QemuVmOptions, shape: VmShape): Promise<void> {
    const partial = join(this.options.dir, `${key}.partial`);
    await rm(partial, { recursive: true, force: true });
    await mkdir(join(partial, "run"), { recursive: true, mode: 0o700 });
    await mkdir(join(partial, "share"), { mode: 0o700 });
    try {
      await createScratchDisk(join(partial, SCRATCH), shape.size.scratchDiskBytes);
      // The worker's own boot: no action runs in it, but the image may (its Docker daemon), so QEMU runs as ids
      // of its own. Its share is empty and never mounted (a mounted 9p share blocks a migration); the resumed VMs
      // mount theirs.
      const identity = this.options.identities?.acquire();
      try {
        // QEMU opens its share itself (9p), as those ids.
        if (identity) await chown(join(partial, "share"), identity.uid, identity.gid);
        const vm = await QemuVm.start({
          ...options,
          runDir: join(partial, "run"),
          scratchDisk: join(partial, SCRATCH),
          share: options.share && { ...options.share, path: join(partial, "share") },
          runAs: identity && { uid: identity.uid, gid: identity.gid },
          resumeFrom: undefined,
          // A namespace of its own, empty: the VM's own (its network, its forwards) is not the snapshot's.
          launchPrefix: ["unshare", "--net", "--"],
        });
        try {
          if (shape.prepare) await writeFile(join(partial, PREPARED), await shape.prepare.run(vm));
          await vm.snapshot(join(partial, MEMORY));
        } finally {
          await vm.kill();
        }
        // The snapshot is the worker's: nothing of it stays writable by ids another runner gets next.
        await chown(join(partial, SCRATCH), 0, 0);
      } finally {
        if (identity) this.options.identities?.release(identity);
      }
      await rm(join(partial, "run"), { recursive: true, force: true });
      await rm(join(partial, "share"), { recursive: true, force: true });
      const dir = join(this.options.dir, key);
      await rename(partial, dir);
      await this.snapshots.insert(key, { dir }, await diskUsage(dir));
    } catch (error) {
      await rm(partial, { recursive: true, force: true });
      throw error;
    }
  }
}

/**
 * What a snapshot fits: the root disk (its content key and the file itself,
 * since the guest caches what it read of it), the VM's size, the guest, QEMU
 * and its accelerator.
 */
async function snapshotKey(options: QemuVmOptions, shape: VmShape): Promise<string> {
  const parts = [
    shape.diskKey,
    await fileId(options.rootDisk),
    await fileId(options.assets.kernel),
    await fileId(options.assets.initramfs),
    options.qemuPath ?? "qemu-system-x86_64",
    options.accelerator ?? "tcg",
    shape.size.memoryBytes,
    shape.size.vcpus,
    shape.size.scratchDiskBytes,
    options.share?.tag ?? "",
    options.rootFormat ?? "erofs",
    options.extraArgs ?? [],
    shape.prepare?.key ?? "",
  ];
  return createHash("sha256").update(JSON.stringify(parts)).digest("hex");
}

/** A file as a resumed VM must find it again: path, inode, size and time (the guest cached what it read). */
export async function fileId(path: string): Promise<string> {
  const info = await stat(path);
  return `${path}:${info.ino}:${info.size}:${info.mtimeMs}`;
}

export async function diskUsage(dir: string): Promise<number> {
  const { stdout } = await run("du", ["-s", "-B1", dir]);
  return Number.parseInt(stdout, 10) || 0;
}
