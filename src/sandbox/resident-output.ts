import { copyFileSync, lstatSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * Moves a command's output file from the sandbox's io directory to `target`, which must lie where the
 * sandbox's user cannot write. The io directory is the sandbox's: a command can replace its own stdout file
 * there by a symlink to a host file only root may read, by a FIFO that would block the worker, or by a
 * directory. So the name is first moved out of the sandbox's reach (to `target`, or to `holdDir` when `target`
 * is on another file system and the file must be copied), and only then looked at: anything but a regular file
 * gives an empty file, as does a missing one (the command never started).
 */
export function deliverOutput(ioDir: string, holdDir: string, name: string, target: string): void {
  const source = join(ioDir, name);
  try {
    renameSync(source, target);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "EXDEV") {
      copyOut(source, join(holdDir, name), target);
    } else {
      // Missing, or a directory where the file was (which rename refuses to put over a file).
      if (code !== "ENOENT") rmSync(source, { recursive: true, force: true });
      writeFileSync(target, "");
    }
    return;
  }
  if (!lstatSync(target).isFile()) {
    rmSync(target, { recursive: true, force: true });
    writeFileSync(target, "");
  }
}

function copyOut(source: string, held: string, target: string): void {
  renameSync(source, held);
  if (lstatSync(held).isFile()) copyFileSync(held, target);
  else writeFileSync(target, "");
  rmSync(held, { recursive: true, force: true });
}
