import { type LaunchStep, MS_BIND } from "../process/launcher.js";

/** Where staged mounts go: under /run, which bwrap's sandbox never shows. */
export const STAGING_DIR = "/run/berth";

/**
 * Mounts made before bwrap starts, as root, in the sandbox's own mount
 * namespace: the unprivileged user bwrap then runs as could not make them
 * (an overlay, a bind of a directory it cannot reach).
 */
export function stagingSteps(): LaunchStep[] {
  return [
    { kind: "private" },
    { kind: "mount", source: "berth", target: "/run", type: "tmpfs", flags: 0, data: "mode=0755" },
    { kind: "mkdir", path: STAGING_DIR },
  ];
}

/** `source` bound at `target`, a new directory under STAGING_DIR. */
export function bindSteps(source: string, target: string): LaunchStep[] {
  return [
    { kind: "mkdir", path: target },
    { kind: "mount", source, target, type: "none", flags: MS_BIND, data: "" },
  ];
}
