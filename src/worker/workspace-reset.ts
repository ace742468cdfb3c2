import { lstatSync, readdirSync, rmSync, type Stats } from "node:fs";
import { join, posix } from "node:path";
import picomatch from "picomatch";

/**
 * What a warm runner's workspace (the directory its actions' input roots are
 * laid out in, kept with the runner) goes through between two actions, done
 * as root on the host in a directory the previous action could write: so
 * nothing here ever follows a symlink, at the end of a path or on its way.
 * A symlink the previous action left where a directory was (`out -> /etc`)
 * is an entry like any other, removed or left as it is, never entered.
 */

/** Empties the workspace (it stays, as the mount point a resident sandbox binds). */
export function emptyWorkspace(root: string): void {
  for (const name of readdirSync(root)) rmSync(join(root, name), { recursive: true, force: true });
}

/**
 * preserve-workspace: removes the previous action's outputs (paths relative
 * to the workspace) and those of its inputs that match a glob of
 * clean-workspace-inputs; everything else the earlier actions left stays.
 * Paths whose parents are not all real directories are left alone: what
 * they name is not where the path says.
 */
export function cleanPreservedWorkspace(
  root: string,
  previous: { outputs: Iterable<string>; inputs: Iterable<string> },
  cleanInputs: readonly string[],
): void {
  for (const path of previous.outputs) removeEntry(root, path);
  if (cleanInputs.length === 0) return;
  // dot: a glob like "**/*.o" also matches files in hidden directories, as a shell's globstar would not;
  // a workspace's inputs have no reason to hide from it.
  const matches = picomatch(cleanInputs as string[], { dot: true });
  for (const path of previous.inputs) if (matches(path)) removeEntry(root, path);
}

/** Removes whatever is at `path` in `root` (a file, a link itself, a directory and its contents). */
function removeEntry(root: string, path: string): void {
  const parts = posix.normalize(path).split("/");
  if (parts.includes("..") || posix.isAbsolute(path) || parts[0] === ".") return;
  let at = root;
  for (const part of parts.slice(0, -1)) {
    at = join(at, part);
    if (!lstatOrUndefined(at)?.isDirectory()) return;
  }
  rmSync(join(at, parts.at(-1) as string), { recursive: true, force: true });
}

/**
 * Before a tree is laid out over a preserved workspace: whatever stands
 * where the tree puts a file or a symlink is removed, and so is anything but
 * a real directory where it puts a directory (parents first, so a symlink
 * planted in place of a directory is gone before anything below it is
 * looked at). Directories that already exist are kept, with their contents.
 */
export function clearWayForTree(
  root: string,
  tree: {
    directories: readonly { path: string }[];
    files: readonly { path: string }[];
    symlinks: readonly { path: string }[];
  },
): void {
  for (const { path } of tree.directories) {
    if (path === "") continue;
    const at = join(root, path);
    const stats = lstatOrUndefined(at);
    if (stats && !stats.isDirectory()) rmSync(at, { force: true });
  }
  for (const { path } of [...tree.files, ...tree.symlinks]) {
    const at = join(root, path);
    if (lstatOrUndefined(at)) rmSync(at, { recursive: true, force: true });
  }
}

function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
