import { join } from "node:path";
import type { SandboxRequest } from "./sandbox.js";

const NOBODY = 65534;

/** What differs between sandboxes on the host's root and on an image's. */
export interface SandboxLayout {
  /** The mount that makes "/": the host's root read-only, or a staged image root writable. */
  root: string[];
  /** Directories covered by an empty tmpfs. */
  hide: string[];
  /** Where bwrap finds the input root, and where the action sees it. */
  inputSource: string;
  inputMount: string;
  /** The working directory, relative to the input root. */
  workDirInRoot: string;
  /** uid 0 inside the user namespace instead of the unprivileged user. */
  runAsRoot: boolean;
  statusFd: number;
  /** Sizes of the private /tmp and /dev/shm tmpfs; 0: the kernel's default (half the memory). */
  tmpSizeBytes: number;
  shmSizeBytes: number;
  /** What bwrap runs: the request's argv, or a program that reads it from elsewhere (see bubblewrap.ts). */
  command: string[];
}

/** bwrap's command line: namespaces, then the mounts in order (later ones cover earlier ones), then the command. */
export function sandboxArgs(request: SandboxRequest, layout: SandboxLayout): string[] {
  const args = [
    "--unshare-user",
    // Inside its user namespace the action is root, or nobody (65534) whatever host uid its slot has, so
    // that it finds itself in the image's or the host's /etc/passwd.
    ...(layout.runAsRoot ? ["--uid", "0", "--gid", "0"] : ["--uid", String(NOBODY), "--gid", String(NOBODY)]),
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    ...(request.network ? [] : ["--unshare-net"]),
    "--die-with-parent",
    "--json-status-fd",
    String(layout.statusFd),
    ...layout.root,
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    // Size-limited, so that filling them stops at the limit instead of at the worker's memory.
    "--perms",
    "1777",
    ...size(layout.shmSizeBytes),
    "--tmpfs",
    "/dev/shm",
    "--perms",
    "1777",
    ...size(layout.tmpSizeBytes),
    "--tmpfs",
    "/tmp",
    ...layout.hide.flatMap((dir) => ["--tmpfs", dir]),
    // The input root comes last so that nothing can hide it, notably the private /tmp when the input root
    // lives under the host's /tmp (bwrap creates its mount point in the tmpfs).
    "--bind",
    layout.inputSource,
    layout.inputMount,
    "--chdir",
    join(layout.inputMount, layout.workDirInRoot),
    "--clearenv",
  ];
  for (const { name, value } of request.env) args.push("--setenv", name, value);
  args.push("--", ...layout.command);
  return args;
}

function size(bytes: number): string[] {
  return bytes > 0 ? ["--size", String(bytes)] : [];
}
