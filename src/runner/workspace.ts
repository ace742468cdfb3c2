import {
  copyFileSync,
  lchownSync,
  linkSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readlinkSync,
  renameSync,
  rmdirSync,
  rmSync,
  type Stats,
  symlinkSync,
} from "node:fs";
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

/**
 * Moves everything in `from` into `to` (the laid-out input root into a warm
 * runner's workspace, and back): one rename per entry of the top level,
 * whatever the tree below holds. `to` must hold none of those names.
 */
export function moveEntries(from: string, to: string): void {
  for (const name of readdirSync(from)) renameSync(join(from, name), join(to, name));
}

/**
 * preserve-workspace: merges the tree in `from` (a new input root) into the
 * workspace `to`: a directory both have is merged, anything else of `from`
 * replaces what `to` has under its name (never entered when it is a link).
 * Returns the paths of what was moved that is not a directory: the new
 * action's inputs.
 */
export function mergeEntries(from: string, to: string, prefix = ""): string[] {
  const moved: string[] = [];
  for (const name of readdirSync(from)) {
    const source = join(from, name);
    const target = join(to, name);
    const path = prefix === "" ? name : `${prefix}/${name}`;
    const sourceIsDir = lstatSync(source).isDirectory();
    const targetStats = lstatOrUndefined(target);
    if (sourceIsDir && targetStats?.isDirectory()) {
      moved.push(...mergeEntries(source, target, path));
      rmdirSync(source);
      continue;
    }
    if (targetStats) rmSync(target, { recursive: true, force: true });
    renameSync(source, target);
    if (sourceIsDir) moved.push(...filesBelow(target, path));
    else moved.push(path);
  }
  return moved;
}

/** Paths of what is below `dir` and not a directory, relative to the workspace (`prefix` is dir's). */
function filesBelow(dir: string, prefix: string): string[] {
  const found: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = `${prefix}/${entry.name}`;
    if (entry.isDirectory()) found.push(...filesBelow(join(dir, entry.name), path));
    else found.push(path);
  }
  return found;
}

/**
 * Gives the directories of `dir` (itself included) to uid and gid, never
 * through a link: the input root was laid out for a slot's user, and a warm
 * runner runs as its own.
 */
export function giveDirectories(dir: string, uid: number, gid: number): void {
  lchownSync(dir, uid, gid);
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) giveDirectories(join(dir, entry.name), uid, gid);
  }
}

/**
 * A copy of the laid-out tree `from` in the empty directory `to` that
 * leaves `from` as it is: directories made anew (given to uid and gid, with
 * their modes), files hard-linked (they are the file cache's read-only
 * copies; a file at its link limit is copied), symlinks made again as they
 * are. Nothing is followed.
 */
export function linkTree(from: string, to: string, uid: number, gid: number): void {
  for (const entry of readdirSync(from, { withFileTypes: true })) {
    const source = join(from, entry.name);
    const target = join(to, entry.name);
    if (entry.isDirectory()) {
      mkdirSync(target, { mode: lstatSync(source).mode & 0o7777 });
      lchownSync(target, uid, gid);
      linkTree(source, target, uid, gid);
    } else if (entry.isSymbolicLink()) {
      symlinkSync(readlinkSync(source), target);
    } else if (entry.isFile()) {
      try {
        linkSync(source, target);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EMLINK") throw err;
        copyFileSync(source, target);
      }
    }
  }
}

function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}

/** What a warm runner's workspace held after its last action, for preserve-workspace. */
export interface WorkspaceContents {
  outputs: readonly string[];
  inputs: readonly string[];
}

/**
 * A warm runner's workspace made ready for the next action: what the last
 * one left removed (all of it, or with preserve-workspace its outputs and
 * the inputs clean-workspace-inputs names), then the new input root, given
 * to the runner's ids, moved (or merged) in. Returns what it now holds.
 */
export function enterWorkspace(
  workspace: string,
  inputRoot: string,
  recycle: { preserveWorkspace: boolean; cleanInputs: readonly string[]; outputs: readonly string[] },
  owner: { uid: number; gid: number },
  last: WorkspaceContents | undefined,
): WorkspaceContents {
  if (recycle.preserveWorkspace && last) cleanPreservedWorkspace(workspace, last, recycle.cleanInputs);
  else emptyWorkspace(workspace);
  giveDirectories(inputRoot, owner.uid, owner.gid);
  let inputs: string[] = [];
  if (recycle.preserveWorkspace) inputs = mergeEntries(inputRoot, workspace);
  else moveEntries(inputRoot, workspace);
  return { outputs: recycle.outputs, inputs };
}
