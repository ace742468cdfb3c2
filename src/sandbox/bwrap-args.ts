import { join } from "node:path";
import type { SandboxRequest, SandboxUser } from "./sandbox.js";

/** Who the action is inside its user namespace unless told: nobody, whatever host uid its slot has. */
export const DEFAULT_USER: SandboxUser = { uid: 65534, gid: 65534 };

/** What differs between sandboxes on the action's kinds of root (see action-root.ts). */
export interface SandboxLayout {
  /** The mounts that make "/": the host's root read-only, or a staged overlay or input root writable. */
  root: string[];
  /** Directories covered by an empty tmpfs. */
  hide: string[];
  /**
   * Where bwrap finds the input root, bound last at `inputMount`; undefined when the root mount already is
   * the input root (`inputMount` is then "/").
   */
  inputSource: string | undefined;
  inputMount: string;
  /** The working directory, relative to the input root. */
  workDirInRoot: string;
  /** The ids inside the user namespace. */
  user: SandboxUser;
  statusFd: number;
  /** Sizes of the private /tmp and /dev/shm tmpfs; 0: the kernel's default (half the memory). */
  tmpSizeBytes: number;
  shmSizeBytes: number;
  /** What bwrap runs: the request's argv, or a program that reads it from elsewhere (see bubblewrap.ts). */
  command: string[];
}

/** bwrap's command line: namespaces, then the mounts in order (later ones cover earlier ones), then the command. */
export function sandboxArgs(request: Pick<SandboxRequest, "env" | "network">, layout: SandboxLayout): string[] {
  const args = [
    "--unshare-user",
    // The ids the action sees (nobody by default, so that it finds itself in the image's or the host's
    // /etc/passwd); on the host it stays its slot's unprivileged uid whatever they are.
    "--uid",
    String(layout.user.uid),
    "--gid",
    String(layout.user.gid),
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
    ...(layout.inputSource === undefined ? [] : ["--bind", layout.inputSource, layout.inputMount]),
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
