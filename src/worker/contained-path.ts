import { chownSync, lstatSync, mkdirSync, readlinkSync, type Stats } from "node:fs";
import { join, posix } from "node:path";
import type { TreeOwner } from "./input-root.js";

/**
 * Paths the action names (its outputs, their parents), resolved inside its
 * input root by the worker, which runs as root. The kernel would follow any
 * symlink the action left there, also one to /etc or to the farm's data, so
 * every component is looked at with lstat instead: a symlink whose target
 * stays inside the root is resolved by hand, within the root; one that climbs
 * above the root, or is absolute and names no place below where the action
 * sees its root (/run/berth/execroot, an image's input root path), ends the
 * walk. An absolute target below that place is walked from the root, by the
 * same rules, never by the kernel. The host paths handed out are made only
 * of real directories, so opening them follows no link.
 *
 * This is race-free because nothing of the action runs while it is used:
 * output parents are made before the sandbox starts, and outputs are read
 * after its PID namespace is gone (bwrap runs with --unshare-pid and
 * --die-with-parent, and BubblewrapSandbox waits for the namespace's pid 1 to
 * die, which the kernel lets happen only once every process in it is gone).
 */

/** As the kernel's MAXSYMLINKS: more links than this on one path is a loop. */
const MAX_SYMLINKS = 40;

/** Where a path leads, inside the root. */
export type ContainedPath =
  /** Something is there: `hostPath` is made of real directories, and `stats` is lstat's of its last component. */
  | { kind: "present"; hostPath: string; stats: Stats }
  /** Nothing there, or a parent is not a directory. */
  | { kind: "absent" }
  /** The path leaves the root; `reason` says through what, for a status message. */
  | { kind: "outside"; reason: string };

/**
 * An input root in which paths are resolved, for one phase during which
 * nothing else changes it: the directories it found real are remembered (a
 * build's outputs share most of their parents), so an instance must not
 * outlive the phase (one before the command runs, another after it).
 */
/**
 * What the action's absolute paths mean. Usually the input root is a
 * directory of a larger file system (the host's, an image's), seen by the
 * action at `seenAs` (/run/berth/execroot, an image's inputRootPath): an
 * absolute symlink target below `seenAs` is followed inside the root, any
 * other absolute target and ".." from the root lead out of it. Without
 * `seenAs` every absolute target leads out. With `chroot` the input root is
 * the action's "/": every absolute target starts again from the root, and
 * ".." from the root stays there, as the kernel resolves them for the
 * action; nothing leads out.
 */
export interface ContainedRootOptions {
  seenAs?: string;
  chroot?: boolean;
}

export class ContainedRoot {
  /** Paths below the root (joined with "/") known to be real directories. */
  readonly #realDirectories = new Set<string>();
  /** The components of the absolute path at which the action sees the root; undefined: none is followed. */
  readonly #seenAs: readonly string[] | undefined;

  /** ".." from the root stays at the root (see ContainedRootOptions). */
  readonly chroot: boolean;

  constructor(
    readonly root: string,
    options: ContainedRootOptions = {},
  ) {
    this.chroot = options.chroot ?? false;
    const seenAs = this.chroot ? "/" : options.seenAs;
    const seen = seenAs === undefined ? undefined : components(seenAs);
    // A path that is not absolute, or climbs, names no one place: nothing absolute is followed then.
    this.#seenAs = seenAs?.startsWith("/") && !seen?.includes("..") ? seen : undefined;
  }

  /**
   * The components below the root that the absolute `target` names, as the
   * action sees it, or undefined when it names no place at or below the
   * root's mount point (compared component by component: a ".." there, or any
   * other path, is outside). What follows may still climb, which the walk refuses.
   */
  insideRoot(target: string): string[] | undefined {
    const seen = this.#seenAs;
    if (seen === undefined || !target.startsWith("/")) return undefined;
    const parts = components(target);
    if (parts.length < seen.length || seen.some((name, i) => parts[i] !== name)) return undefined;
    return parts.slice(seen.length);
  }

  /**
   * Resolves the absolute symlink target `target` the way resolve() does a
   * path, following every link (the last one too) but only within the root:
   * what a link with that target leads to, as far as it stays inside.
   */
  resolveTarget(target: string): ContainedPath {
    const inside = this.insideRoot(target);
    if (inside === undefined) {
      return { kind: "outside", reason: `"${target}" is an absolute path outside the input root` };
    }
    return this.resolve(inside.join("/"), true);
  }

  /**
   * Resolves `path` (relative, "/"-separated, e.g. a working directory and
   * an output joined) below the root without following any symlink out of
   * it. The last component is not followed (a symlink there is reported as
   * one) unless `followLast` says the path must name what the link points to.
   * Synchronous, like the other small file-system calls between the
   * command's end and its result: each would otherwise wait for the thread pool.
   */
  resolve(path: string, followLast = false): ContainedPath {
    const walk = new Walk(this.root, path, this);
    for (;;) {
      const step = walk.next();
      if (!step) return { kind: "absent" };
      if (step.kind !== "component") return step;
      if (!step.last && this.#realDirectories.has(step.inRoot)) {
        walk.enter(step.name);
        continue;
      }
      const info = lstatOrUndefined(step.hostPath);
      if (!info) return { kind: "absent" };
      if (step.last && !(followLast && info.isSymbolicLink())) {
        return { kind: "present", hostPath: step.hostPath, stats: info };
      }
      if (info.isDirectory()) this.#enter(walk, step);
      else if (info.isSymbolicLink()) {
        const outside = walk.follow(step.hostPath, readlinkSync(step.hostPath));
        if (outside) return outside;
      } else return { kind: "absent" };
    }
  }

  /**
   * Makes the missing directories of `path` below the root (the last
   * component too), giving each to `owner`. A symlink that stays inside the
   * root is resolved as in `resolve`, the last component's too (the path
   * names a directory); one that leads out of it, or a file on the way, stops
   * the walk with nothing made through it. The command may still write
   * through such a link where its sandbox lets it (in its own view of the
   * file system); the output is then refused when collected.
   */
  makeDirectories(path: string, owner: TreeOwner | undefined): void {
    const walk = new Walk(this.root, path, this);
    for (;;) {
      const step = walk.next();
      if (step?.kind !== "component") return;
      if (this.#realDirectories.has(step.inRoot)) {
        walk.enter(step.name);
        continue;
      }
      const info = lstatOrUndefined(step.hostPath);
      if (!info) {
        // Made by name in a real directory: mkdir follows no symlink in its last component.
        mkdirSync(step.hostPath);
        if (owner) chownSync(step.hostPath, owner.uid, owner.gid);
        this.#enter(walk, step);
      } else if (info.isDirectory()) {
        this.#enter(walk, step);
      } else if (info.isSymbolicLink()) {
        if (walk.follow(step.hostPath, readlinkSync(step.hostPath))) return;
      } else {
        return;
      }
    }
  }

  #enter(walk: Walk, step: { name: string; inRoot: string }): void {
    this.#realDirectories.add(step.inRoot);
    walk.enter(step.name);
  }
}

type Step =
  /** `inRoot`: the path below the root ("/"-joined real directories and the name). */
  | { kind: "component"; name: string; hostPath: string; inRoot: string; last: boolean }
  | { kind: "outside"; reason: string };

/** The walk's state: the real directories entered so far and the components still to go. */
class Walk {
  /** Names of the directories entered below the root, each a real directory. */
  readonly #at: string[] = [];
  /** Components still to walk, the next one last. */
  readonly #pending: string[];
  #links = 0;
  #done = false;
  /** The last symlink followed, for messages. */
  #via: string | undefined;

  constructor(
    readonly root: string,
    path: string,
    private readonly contained: Pick<ContainedRoot, "insideRoot" | "chroot">,
  ) {
    this.#pending = components(path).reverse();
  }

  /** The next name to look at, with the host path it has; ".." is handled here. Undefined once the last was given. */
  next(): Step | undefined {
    while (!this.#done) {
      const name = this.#pending.pop();
      if (name === "..") {
        if (this.#at.length > 0) this.#at.pop();
        else if (!this.contained.chroot) return this.#outside("climbs above the input root");
      }
      if (name === undefined || (name === ".." && this.#pending.length === 0)) {
        // The path ends in the directory entered last (the root, for an empty path).
        this.#done = true;
        const inRoot = this.#at.join("/");
        return { kind: "component", name: "", hostPath: join(this.root, inRoot), inRoot, last: true };
      }
      if (name === "..") continue;
      this.#done = this.#pending.length === 0;
      const inRoot = [...this.#at, name].join("/");
      return { kind: "component", name, hostPath: join(this.root, inRoot), inRoot, last: this.#done };
    }
    return undefined;
  }

  enter(name: string): void {
    this.#at.push(name);
  }

  /** Continues with `target`, the symlink at `hostPath`; what to report when it cannot stay inside. */
  follow(hostPath: string, target: string): { kind: "outside"; reason: string } | undefined {
    const link = `the symbolic link "${posix.join(...this.#at, posix.basename(hostPath))}" -> "${target}"`;
    this.#via = link;
    if (++this.#links > MAX_SYMLINKS) return this.#outside(`passes more than ${MAX_SYMLINKS} symbolic links`);
    if (target.startsWith("/")) {
      const inside = this.contained.insideRoot(target);
      if (inside === undefined) {
        this.#done = true;
        return { kind: "outside", reason: `leads out of the input root through ${link}, an absolute path` };
      }
      // Back to the root, and on from there with what the target names below it.
      this.#at.length = 0;
      this.#pending.push(...inside.reverse());
      this.#done = false;
      return undefined;
    }
    this.#pending.push(...components(target).reverse());
    // A link in the last place (followed only when asked) leads on to its target.
    this.#done = false;
    return undefined;
  }

  #outside(what: string): { kind: "outside"; reason: string } {
    this.#done = true;
    return { kind: "outside", reason: this.#via ? `${what} (after ${this.#via})` : what };
  }
}

/** The components of a "/"-separated path, without the empty and "." ones that change nothing. */
function components(path: string): string[] {
  return path.split("/").filter((c) => c !== "" && c !== ".");
}

/** lstat, or undefined when nothing is there (or the name cannot be, e.g. ENAMETOOLONG: nothing can be there either). */
function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path, { throwIfNoEntry: false });
  } catch {
    return undefined;
  }
}
