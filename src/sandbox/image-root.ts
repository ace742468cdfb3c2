import { mkdir } from "node:fs/promises";
import { join, relative } from "node:path";
import { sandboxArgs } from "./bwrap-args.js";
import type { ImageRoot, SandboxRequest } from "./sandbox.js";

/** Where, in the private mount namespace, the overlay and the input root are mounted before bwrap starts. */
const STAGED_ROOTFS = "/run/berth/rootfs";
const STAGED_INPUT = "/run/berth/execroot";

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
 * `unshare … sh -c …`: in a private mount namespace (so nothing shows on
 * the host and everything goes when the sandbox does), mount the image's
 * overlay and bind the input root at paths the unprivileged user reaches,
 * then become that user and run bwrap. Paths and options travel as
 * arguments, never inside the script.
 */
export function imageLaunchArgs(image: ImageRoot, inputRoot: string, uid: number, gid: number): string[] {
  const script = [
    "set -e",
    "mount -t tmpfs -o mode=0755 berth /run",
    `mkdir -p ${STAGED_ROOTFS} ${STAGED_INPUT}`,
    `(cd "$1" && mount -t overlay overlay -o "$2" ${STAGED_ROOTFS})`,
    `mount --bind "$3" ${STAGED_INPUT}`,
    "shift 3",
    `exec setpriv --reuid=${uid} --regid=${gid} --clear-groups -- "$@"`,
  ].join("\n");
  return [
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    script,
    "sh",
    image.overlayCwd,
    image.overlayOptions,
    inputRoot,
  ];
}

/** bwrap's command line for an action whose root is the staged overlay. */
export function imageBwrapArgs(
  request: SandboxRequest,
  image: ImageRoot,
  workDirInRoot: string,
  statusFd: number,
): string[] {
  return sandboxArgs(request, {
    root: ["--bind", STAGED_ROOTFS, "/"],
    hide: [],
    inputSource: STAGED_INPUT,
    inputMount: image.inputRootPath,
    workDirInRoot,
    runAsRoot: image.runAsRoot,
    statusFd,
  });
}
