import { execFile } from "node:child_process";
import { rename, rm, truncate, writeFile } from "node:fs/promises";
import { promisify } from "node:util";

const run = promisify(execFile);

/** File systems the guest's init mounts a root disk as (berth.rootfs= on its kernel command line). */
export type RootDiskFormat = "erofs" | "ext4";

export interface RootDiskOptions {
  format?: RootDiskFormat;
  /** ext4 only: the disk's size (erofs sizes itself); default 64 MiB more than twice the folder's bytes. */
  sizeBytes?: number;
}

/**
 * Writes a read-only root disk holding `folder` (ownership and modes as they are on the host's copy) to
 * `image`, without loop mounts: mkfs.erofs, or mkfs.ext4 -d. The file appears only once complete.
 */
export async function buildRootDisk(folder: string, image: string, options: RootDiskOptions = {}): Promise<void> {
  const format = options.format ?? "erofs";
  const partial = `${image}.partial`;
  await rm(partial, { force: true });
  try {
    if (format === "erofs") {
      await run("mkfs.erofs", ["--quiet", "-T0", partial, folder]);
    } else {
      const size = options.sizeBytes ?? 2 * (await folderBytes(folder)) + 64 * 1024 ** 2;
      await writeFile(partial, "");
      await truncate(partial, size);
      await run("mkfs.ext4", ["-q", "-F", "-O", "^has_journal", "-m", "0", "-d", folder, partial]);
    }
    await rename(partial, image);
  } catch (error) {
    await rm(partial, { force: true });
    throw new Error(`cannot build a ${format} root disk from ${folder}: ${(error as Error).message}`);
  }
}

/** A sparse, empty ext4 disk of `sizeBytes` for a VM's writes (its overlay's upper half). */
export async function createScratchDisk(image: string, sizeBytes: number): Promise<void> {
  await writeFile(image, "");
  await truncate(image, sizeBytes);
  await run("mkfs.ext4", ["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1", "-m", "0", image]);
}

async function folderBytes(folder: string): Promise<number> {
  const { stdout } = await run("du", ["-s", "-B1", "--apparent-size", folder]);
  return Number.parseInt(stdout, 10) || 0;
}
