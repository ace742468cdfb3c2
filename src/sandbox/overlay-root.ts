import { mkdir } from "node:fs/promises";
import { join, relative } from "node:path";
import type { OverlayRoot } from "./action-root.js";
import type { RootSetup } from "./root-setup.js";
import { bindSteps, STAGING_DIR, stagingSteps } from "./staging.js";

/** Where, in the private mount namespace, the overlay and the input root are mounted before bwrap starts. */
const STAGED_ROOTFS = join(STAGING_DIR, "rootfs");
const STAGED_INPUT = join(STAGING_DIR, "execroot");

/**
 * An overlay as the action's root: before bwrap, in a private mount
 * namespace (so nothing shows on the host and everything goes when the
 * sandbox does), the launcher mounts the overlay and binds the input root at
 * paths the unprivileged user reaches; bwrap makes the overlay "/" and binds
 * the input root into it.
 */
export async function overlayRootSetup(overlay: OverlayRoot, inputRoot: string): Promise<RootSetup> {
  await prepareMountPoints(overlay);
  return {
    steps: [
      ...stagingSteps(),
      { kind: "mkdir", path: STAGED_ROOTFS },
      // The overlay's options name its layers relative to overlayCwd, to stay within one page.
      { kind: "chdir", path: overlay.overlayCwd },
      {
        kind: "mount",
        source: "overlay",
        target: STAGED_ROOTFS,
        type: "overlay",
        flags: 0,
        data: overlay.overlayOptions,
      },
      { kind: "chdir", path: "/" },
      ...bindSteps(inputRoot, STAGED_INPUT),
    ],
    layout: {
      root: ["--bind", STAGED_ROOTFS, "/"],
      hide: [],
      inputSource: STAGED_INPUT,
      inputMount: overlay.inputRootPath,
    },
    // What the action writes to the image lands in its upper layer, whoever owned the file it changed.
    areas: [{ dir: overlay.upperDir }],
  };
}

/**
 * Mount points the sandbox needs, made in the action's upper layer: bwrap,
 * running as the unprivileged user, could not create them in an image's
 * root-owned directories (and a small image may lack /proc or /tmp).
 */
async function prepareMountPoints(overlay: OverlayRoot): Promise<void> {
  const points = ["proc", "dev", "tmp", relative("/", overlay.inputRootPath)];
  await Promise.all(points.map((p) => mkdir(join(overlay.upperDir, p), { recursive: true, mode: 0o755 })));
}
