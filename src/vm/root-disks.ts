import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { type Lease, PinnedLru } from "../cache/pinned-lru.js";
import { overlayMountArgs, writeLayerLinks } from "../image/overlay.js";
import { buildRootDisk } from "./disk-image.js";

const run = promisify(execFile);

/** A root disk built from an image's layers, held while a VM uses it. */
export interface RootDiskLease {
  /** The read-only erofs disk: the layers merged, whiteouts applied, ownership and modes as the layer store keeps them. */
  readonly path: string;
  /** Names the disk's content: the same key, the same disk (a snapshot of a VM booted on it fits it). */
  readonly key: string;
  release(): Promise<void>;
}

export interface RootDisksOptions {
  /** Where the disks are kept (the worker's own directory). */
  dir: string;
  /** Least recently used disks nobody holds go while the disks add up to more. */
  maxBytes: number;
  onError?: (err: unknown) => void;
}

/**
 * The VM runner's root disks, one per image (its layers, bottom to top), made
 * once and kept under a byte cap, least recently used first, never while a VM
 * holds one: the layers are mounted as one read-only overlay, so overlayfs
 * applies the whiteouts, and mkfs.erofs writes what it shows. The layer
 * store already dropped set-user-ID bits and group or other write
 * permission; directories whose mode it tamed get it back in the VM's own
 * writable layer (see VmRunner), as in mount mode.
 */
export class RootDisks {
  private readonly disks: PinnedLru<string, string>;

  private constructor(private readonly options: RootDisksOptions) {
    this.disks = new PinnedLru<string, string>({
      maxBytes: options.maxBytes,
      dispose: (_key, path) => rm(path, { force: true }),
      onError: options.onError,
    });
  }

  /** Opens the store in `dir`, keeping the disks a previous worker finished and removing what it left half-made. */
  static async open(options: RootDisksOptions): Promise<RootDisks> {
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    const disks = new RootDisks(options);
    const found = [];
    for (const name of await readdir(options.dir)) {
      const path = join(options.dir, name);
      const match = /^([0-9a-f]{64})\.erofs$/.exec(name);
      if (!match) {
        // A merge a killed worker left mounted goes first: removing through its read-only overlay would fail.
        if (name.startsWith(".merge-")) await run("umount", ["-l", join(path, "merged")]).catch(() => {});
        await rm(path, { recursive: true, force: true });
        continue;
      }
      const info = await stat(path);
      found.push({ key: match[1] as string, value: path, size: info.size, usedAt: info.mtimeMs });
    }
    await disks.disks.restore(found);
    return disks;
  }

  /** The disk of the image whose layers are `layerDirs` (bottom to top), made if missing. */
  async acquire(layerDirs: readonly string[]): Promise<RootDiskLease> {
    const key = createHash("sha256").update(JSON.stringify(layerDirs)).digest("hex");
    const lease: Lease<string> = await this.disks.acquire(key, async () => {
      const path = join(this.options.dir, `${key}.erofs`);
      await this.build(layerDirs, path);
      return { value: path, size: (await stat(path)).size };
    });
    return { path: lease.value, key, release: () => lease.release() };
  }

  get bytes(): number {
    return this.disks.bytes;
  }

  /** Nothing to stop: the disks stay on disk for the next worker (open() finds them). */
  async close(): Promise<void> {}

  private async build(layerDirs: readonly string[], path: string): Promise<void> {
    if (layerDirs.length === 1) {
      await buildRootDisk(layerDirs[0] as string, path);
      return;
    }
    const work = join(this.options.dir, `.merge-${createHash("sha256").update(path).digest("hex").slice(0, 16)}`);
    const merged = join(work, "merged");
    await rm(work, { recursive: true, force: true });
    await mkdir(merged, { recursive: true, mode: 0o700 });
    try {
      // Read-only (no upper layer): nothing of the layers can change while mkfs.erofs reads them.
      const args = overlayMountArgs(layerDirs, undefined, undefined, join(work, "links"));
      await writeLayerLinks(args);
      await run("mount", ["-t", "overlay", "overlay", "-o", `ro,${args.options}`, merged], { cwd: args.cwd });
      try {
        await buildRootDisk(merged, path);
      } finally {
        await run("umount", [merged]);
      }
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
}
