/**
 * What the action sees as "/". Every kind has the sandbox's own /proc, /dev
 * and size-limited /tmp and /dev/shm; they differ in what lies beneath:
 *
 * - the host's root, read-only, with the input root bound at
 *   /run/berth/execroot (Bazel's actions: their tools are the host's);
 * - an overlay of lower layers (an image's, or the tree expand mode laid
 *   out) with an upper layer of the action's own, the input root bound at
 *   `inputRootPath` (container images, mount and expand mode);
 * - the input root itself, as in a chroot (BuildStream, buildbox-run, recc:
 *   the input root is a whole sysroot); nothing of the host shows.
 */
export type ActionRoot = HostRoot | OverlayRoot | InputRootAsRoot;

export interface HostRoot {
  kind: "host";
}

/** Layers that never change, and the action's writes in an upper layer discarded with it. */
export interface OverlayRoot {
  kind: "overlay";
  /** The overlay's options (mount -o), from src/image/overlay.ts, and the directory to mount from. */
  overlayOptions: string;
  overlayCwd: string;
  /** The overlay's upper directory (also named in the options); the sandbox makes its mount points there. */
  upperDir: string;
  /** Where the input root appears (absolute); the command starts there plus its working directory. */
  inputRootPath: string;
}

/** The input root is "/"; the working directory and outputs are relative to it, as they are to any input root. */
export interface InputRootAsRoot {
  kind: "input-root";
}

export const HOST_ROOT: HostRoot = { kind: "host" };
export const INPUT_ROOT_AS_ROOT: InputRootAsRoot = { kind: "input-root" };
