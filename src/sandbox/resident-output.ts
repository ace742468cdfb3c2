import { copyFileSync, lstatSync, renameSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * Moves a command's output file from the sandbox's io directory to `target`. The io directory is the
 * sandbox's (a command can replace its own stdout file there by a symlink to a host file only root may read,
 * or by a FIFO that would block the worker): the file is first moved to `holdDir`, out of the sandbox's
 * reach, then taken only if it is a regular file; anything else gives an empty file, as does a missing one
 * (the command never started).
 */
export function deliverOutput(ioDir: string, holdDir: string, name: string, target: string): void {
  const held = join(holdDir, name);
  try {
    renameSync(join(ioDir, name), held);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    writeFileSync(target, "");
    return;
  }
  if (!lstatSync(held).isFile()) {
    rmSync(held, { recursive: true, force: true });
    writeFileSync(target, "");
    return;
  }
  try {
    renameSync(held, target);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EXDEV") throw error;
    copyFileSync(held, target);
    unlinkSync(held);
  }
}
