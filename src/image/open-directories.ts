import type { Stats } from "node:fs";
import { chmod, chown, lstat, mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { NodeProperty } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { hostMode } from "./host-mode.js";

/**
 * Directories an image makes writable by group or others (a 0777
 * /workspace, a 1777 /var/tmp) are stored without that permission
 * (hostMode): on the host, no local user may plant files in them. Inside
 * an action they are what the image says again, at no risk to the host:
 * each is made in the action's own overlay upper layer, with that mode,
 * before the overlay is mounted. overlayfs shows a merged directory with
 * the attributes of its upper copy, and whatever the action writes there
 * goes to its upper layer and is discarded with it.
 */

/** The mode an image gives a directory, less set-user-ID and set-group-ID: what an action may see. */
export function imageMode(mode: number): number {
  return mode & 0o1777;
}

/** Whether the host copy of a directory with this mode differs from what the image says. */
export function isOpened(mode: number): boolean {
  return hostMode(mode) !== imageMode(mode);
}

/** A stored tree (one layer, or an expanded image) and what it knows of its directories. */
export interface LowerView {
  dir: string;
  /** Directories of this tree (relative paths) tamed on the host, with the mode the image gives them. */
  opened: ReadonlyMap<string, number>;
  /** Opaque directories of this layer (they hide the layers below). */
  opaque: ReadonlySet<string>;
}

/** A directory to make in an action's upper layer before the overlay is mounted. */
export interface UpperDirectory {
  path: string;
  mode: number;
  uid: number;
  gid: number;
}

/** Node property by which an expanded tree's Directory carries the mode the image gave it, when tamed. */
export const IMAGE_MODE_PROPERTY = "berth.image-mode";

export function imageModeProperty(mode: number): NodeProperty[] {
  return isOpened(mode) ? [{ name: IMAGE_MODE_PROPERTY, value: imageMode(mode).toString(8) }] : [];
}

/** The image's own mode of a tamed directory, from its node properties (undefined if none or malformed). */
export function imageModeOf(properties: readonly NodeProperty[] | undefined): number | undefined {
  const value = properties?.find((p) => p.name === IMAGE_MODE_PROPERTY)?.value;
  if (value === undefined || !/^[0-7]{1,4}$/.test(value)) return undefined;
  return imageMode(Number.parseInt(value, 8));
}

/**
 * The directories to make in an upper layer over `lowers` (bottom to top)
 * so that the merged view shows each opened directory with its image's
 * mode: the directory itself, and each of its ancestors with the
 * attributes the merged view has anyway. A directory counts only where the
 * topmost layer holding it is the one that opened it (a layer above may
 * give it another mode, delete it or hide it).
 */
export async function upperDirectories(lowers: readonly LowerView[]): Promise<UpperDirectory[]> {
  const wanted = new Map<string, number>();
  for (const [index, lower] of lowers.entries()) {
    for (const [path, mode] of lower.opened) {
      const top = await resolve(lowers, path.split("/"));
      if (top?.index === index) wanted.set(path, mode);
    }
  }
  const made = new Map<string, UpperDirectory>();
  for (const path of wanted.keys()) {
    const parts = path.split("/");
    for (let depth = 1; depth <= parts.length; depth++) {
      const prefix = parts.slice(0, depth).join("/");
      if (made.has(prefix)) continue;
      const found = await resolve(lowers, parts.slice(0, depth));
      if (!found) break; // hidden meanwhile: nothing to show
      const own = wanted.get(prefix);
      made.set(prefix, {
        path: prefix,
        mode: own ?? found.info.mode & 0o7777,
        uid: found.info.uid,
        gid: found.info.gid,
      });
    }
  }
  return [...made.values()].sort((a, b) => a.path.split("/").length - b.path.split("/").length);
}

/** Makes `dirs` (parents first) in the empty upper layer `upper`. */
export async function makeUpperDirectories(upper: string, dirs: readonly UpperDirectory[]): Promise<void> {
  for (const dir of dirs) {
    const path = join(upper, dir.path);
    await mkdir(path);
    await chown(path, dir.uid, dir.gid);
    // chmod, unlike mkdir, is not narrowed by the umask; after chown, which would clear set-group-ID.
    await chmod(path, dir.mode);
  }
}

/** The topmost lower in which `parts` is a visible directory, as overlayfs would merge them. */
async function resolve(
  lowers: readonly LowerView[],
  parts: readonly string[],
): Promise<{ index: number; info: Stats } | undefined> {
  for (let index = lowers.length - 1; index >= 0; index--) {
    const lower = lowers[index] as LowerView;
    let hidesBelow = false;
    for (let depth = 1; depth < parts.length; depth++) {
      const prefix = parts.slice(0, depth).join("/");
      const info = await lstat(join(lower.dir, prefix)).catch(() => undefined);
      if (!info) continue;
      // A file, symlink or whiteout (a 0/0 character device) in the way: nothing below shows.
      if (!info.isDirectory()) return undefined;
      if (lower.opaque.has(prefix)) hidesBelow = true;
    }
    const info = await lstat(join(lower.dir, ...parts)).catch(() => undefined);
    if (info) return info.isDirectory() ? { index, info } : undefined;
    if (hidesBelow) return undefined;
  }
  return undefined;
}
