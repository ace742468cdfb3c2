import { mkdir } from "node:fs/promises";
import { join, relative } from "node:path";
import type { LaunchStep } from "../process/launcher.js";
import { sandboxArgs } from "./bwrap-args.js";
import type { ImageRoot, SandboxRequest } from "./sandbox.js";
import { bindSteps, STAGING_DIR, stagingSteps } from "./staging.js";

/** Where, in the private mount namespace, the overlay and the input root are mounted before bwrap starts. */
const STAGED_ROOTFS = join(STAGING_DIR, "rootfs");
const STAGED_INPUT = join(STAGING_DIR, "execroot");

/**
 * Mount points the sandbox needs, made in the action's upper layer: bwrap,
 * running as the unprivileged user, could not create them in an image's
 * root-owned directories (and a small image may lack /proc or /tmp).
 */
export async function prepareImageMountPoints(image: ImageRoot): Promise<void> {
  const points = ["proc", "dev", "tmp", relative("/", image.inputRootPath)];
  await Promise.all(points.map((p) => mkdir(join(image.upperDir, p), { recursive: true, mode: 0o755 })));
}

/**
 * What the launcher does before bwrap: in a private mount namespace (so
 * nothing shows on the host and everything goes when the sandbox does),
 * mount the image's overlay and bind the input root at paths the
 * unprivileged user reaches.
 */
export function imageLaunchSteps(image: ImageRoot, inputRoot: string): LaunchStep[] {
  return [
    ...stagingSteps(),
    { kind: "mkdir", path: STAGED_ROOTFS },
    // The overlay's options name its layers relative to overlayCwd, to stay within one page.
    { kind: "chdir", path: image.overlayCwd },
    { kind: "mount", source: "overlay", target: STAGED_ROOTFS, type: "overlay", flags: 0, data: image.overlayOptions },
    { kind: "chdir", path: "/" },
    ...bindSteps(inputRoot, STAGED_INPUT),
  ];
}

/** bwrap's command line for an action whose root is the staged overlay. */
export function imageBwrapArgs(
  request: SandboxRequest,
  image: ImageRoot,
  workDirInRoot: string,
  statusFd: number,
  sizes: { tmpSizeBytes: number; shmSizeBytes: number },
): string[] {
  return sandboxArgs(request, {
    root: ["--bind", STAGED_ROOTFS, "/"],
    hide: [],
    inputSource: STAGED_INPUT,
    inputMount: image.inputRootPath,
    workDirInRoot,
    runAsRoot: image.runAsRoot,
    statusFd,
    ...sizes,
    command: request.argv,
  });
}
