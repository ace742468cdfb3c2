import { lstatSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { RootSetup } from "./root-setup.js";
import { bindSteps, STAGING_DIR, stagingSteps } from "./staging.js";

/** Where, in the private mount namespace, the input root is bound before bwrap makes it "/". */
const STAGED_ROOT = join(STAGING_DIR, "root");
/** The sandbox's own file systems, mounted over whatever the input root holds there. */
const MOUNT_POINTS = ["proc", "dev", "tmp"];

/**
 * The input root as the action's root, as in a chroot: bound (by root, at a
 * path the unprivileged user reaches whatever the data directory's modes)
 * and made "/" by bwrap, which shows nothing of the host's root.
 */
export function inputRootAsRootSetup(inputRoot: string): RootSetup {
  prepareMountPoints(inputRoot);
  return {
    steps: [...stagingSteps(), ...bindSteps(inputRoot, STAGED_ROOT)],
    layout: { root: ["--bind", STAGED_ROOT, "/"], hide: [], inputSource: undefined, inputMount: "/" },
    areas: [],
  };
}

/**
 * Makes /proc, /dev and /tmp real directories of the input root before bwrap
 * mounts on them. bwrap would make a missing one itself, following whatever
 * symlink the client put in its place; here each is a single name in the
 * input root's own directory, which mkdir and unlink never follow. A symlink
 * or file there is removed from the action's copy (the mount would cover it).
 */
function prepareMountPoints(inputRoot: string): void {
  for (const name of MOUNT_POINTS) {
    const path = join(inputRoot, name);
    const info = lstatSync(path, { throwIfNoEntry: false });
    if (info?.isDirectory()) continue;
    if (info) rmSync(path);
    mkdirSync(path, { mode: 0o755 });
  }
}
