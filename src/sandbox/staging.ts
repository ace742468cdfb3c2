import { type LaunchStep, MS_BIND } from "../process/launcher.js";

/**
 * Mounts made before bwrap starts, as root, in the sandbox's own mount
 * namespace: the unprivileged user bwrap then runs as could not make them
 * (an overlay, a bind of a directory it cannot reach). They go under /run,
 * which bwrap's sandbox never shows.
 */
export function stagingSteps(): LaunchStep[] {
  return [
    { kind: "private" },
    { kind: "mount", source: "berth", target: "/run", type: "tmpfs", flags: 0, data: "mode=0755" },
    { kind: "mkdir", path: "/run/berth" },
  ];
}

/** `source` bound at `target`, a new directory under /run/berth. */
export function bindSteps(source: string, target: string): LaunchStep[] {
  return [
    { kind: "mkdir", path: target },
    { kind: "mount", source, target, type: "none", flags: MS_BIND, data: "" },
  ];
}
