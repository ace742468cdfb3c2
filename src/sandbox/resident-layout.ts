import { lstatSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import type { LaunchStep } from "../process/launcher.js";
import type { ActionRoot } from "./action-root.js";
import { AGENT_MOUNT } from "./agent-program.js";
import { INPUT_ROOT_MOUNT } from "./bubblewrap.js";
import { sandboxArgs } from "./bwrap-args.js";
import type { WritableArea } from "./disk-usage.js";
import { inputRootAsRootSetup } from "./input-root-as-root.js";
import type { SandboxLimits } from "./limits.js";
import { overlayRootSetup } from "./overlay-root.js";
import type { SandboxUser } from "./sandbox.js";
import { bindSteps, STAGING_DIR, stagingSteps } from "./staging.js";

/** Where the agent sees the sandbox's io directory (stdout and stderr files, a piped process's FIFOs). */
export const IO_MOUNT = "/run/berth/io";
/** Where the agent sees a root other than the host's, which it chroots each command into. */
export const COMMAND_ROOT = "/run/berth/root";
const STAGED_INPUT = join(STAGING_DIR, "resident-input");
const STAGED_IO = join(STAGING_DIR, "resident-io");
const STAGED_AGENT = join(STAGING_DIR, "resident-agent");
const STATUS_FD = 3;

/** How a resident sandbox is made for one kind of root (see action-root.ts). */
export interface ResidentLayout {
  /** What the launcher mounts, as root, before it starts bwrap as the slot's user. */
  steps: LaunchStep[];
  /** bwrap's options, up to (without) the "--" before the agent's command. */
  bwrapOptions: string[];
  /** The directory the agent chroots each command into, as it sees it; "" for none (the host's root). */
  commandRoot: string;
  /** Where a command sees the input root. */
  inputMount: string;
  /**
   * Where the action writes, for the disk bounds: its input root, an image's upper layer, and on the host's
   * root the io directory, which commands see (at IO_MOUNT) and could fill.
   */
  writableAreas: WritableArea[];
}

export interface LayoutOptions {
  root: ActionRoot;
  /** The host directory of the agent's program (agent-program.ts), bound read-only at AGENT_MOUNT. */
  agentDir: string;
  inputRoot: string;
  ioDir: string;
  /** The slot's host uid: the action's own files in its input root are those it owns. */
  uid: number;
  user: SandboxUser;
  network: boolean;
  limits: SandboxLimits;
  /** Host files an action on the host's root must not open (see BubblewrapSandboxOptions.maskedFiles). */
  masked: readonly string[];
}

/**
 * bwrap's command line for a resident sandbox: the same namespaces and mounts as a one-shot sandbox
 * (bwrap-args.ts), plus the io directory, and the agent as the sandbox's pid 1.
 *
 * On the host's root the agent and its commands share one view, the host's root read-only with the input
 * root at INPUT_ROOT_MOUNT. Any other root (an image's overlay, the input root itself) may lack the libraries
 * the agent's program needs, so the agent runs on the host's root and the action's root is mounted whole,
 * with its own /proc, /dev, /tmp and /dev/shm, at COMMAND_ROOT, where the agent chroots each command: the
 * command sees only its root, as with a one-shot sandbox. The agent keeps CAP_SYS_CHROOT (of the sandbox's
 * user namespace) for that, and drops every capability in each command.
 */
export async function residentLayout(options: LayoutOptions): Promise<ResidentLayout> {
  const { root, inputRoot, ioDir, user, network, limits } = options;
  const sizes = { tmpSizeBytes: limits.tmpSizeBytes, shmSizeBytes: limits.shmSizeBytes };
  const hostRoot = ["--ro-bind", "/", "/", ...options.masked.flatMap((path) => ["--ro-bind", "/dev/null", path])];
  const ioBind = ["--bind", STAGED_IO, IO_MOUNT, "--ro-bind", STAGED_AGENT, AGENT_MOUNT];
  const staged = [...bindSteps(ioDir, STAGED_IO), ...bindSteps(options.agentDir, STAGED_AGENT)];
  if (root.kind === "host") {
    const args = sandboxArgs(
      { env: [], network },
      {
        ...sizes,
        root: hostRoot,
        hide: ["/run"],
        inputSource: STAGED_INPUT,
        inputMount: INPUT_ROOT_MOUNT,
        workDirInRoot: "",
        user,
        statusFd: STATUS_FD,
        command: [],
      },
    );
    return {
      steps: [...stagingSteps(), ...bindSteps(inputRoot, STAGED_INPUT), ...staged],
      // /run read-only once its mounts are in: on this root the agent shares the commands' view, and a command
      // that could rename /run/berth would hand the agent its own io directory and working directory.
      bwrapOptions: withBefore(args, "--chdir", [...ioBind, "--remount-ro", "/run", "--as-pid-1"]),
      commandRoot: "",
      inputMount: INPUT_ROOT_MOUNT,
      writableAreas: [
        { dir: inputRoot, owner: options.uid },
        { dir: ioDir, owner: options.uid },
      ],
    };
  }
  const setup = root.kind === "overlay" ? await overlayRootSetup(root, inputRoot) : inputRootAsRootSetup(inputRoot);
  const args = sandboxArgs(
    { env: [], network },
    {
      ...sizes,
      root: hostRoot,
      hide: ["/run"],
      inputSource: undefined,
      inputMount: "/",
      workDirInRoot: "",
      user,
      statusFd: STATUS_FD,
      command: [],
    },
  );
  const under = (path: string) => join(COMMAND_ROOT, path);
  const commandMounts = [
    ...rebase(setup.layout.root, COMMAND_ROOT),
    "--proc",
    under("/proc"),
    "--dev",
    under("/dev"),
    "--perms",
    "1777",
    ...size(sizes.shmSizeBytes),
    "--tmpfs",
    under("/dev/shm"),
    "--perms",
    "1777",
    ...size(sizes.tmpSizeBytes),
    "--tmpfs",
    under("/tmp"),
    ...(setup.layout.inputSource === undefined
      ? []
      : ["--bind", setup.layout.inputSource, under(setup.layout.inputMount)]),
  ];
  return {
    steps: [...setup.steps, ...staged],
    bwrapOptions: withBefore(args, "--chdir", [
      ...commandMounts,
      ...ioBind,
      "--as-pid-1",
      "--cap-add",
      "CAP_SYS_CHROOT",
    ]),
    commandRoot: COMMAND_ROOT,
    inputMount: setup.layout.inputMount,
    writableAreas: [{ dir: inputRoot, owner: options.uid }, ...setup.areas],
  };
}

/** `args` (sandboxArgs's, ending in "--") without the "--", with `extra` inserted before the first `marker`. */
function withBefore(args: string[], marker: string, extra: string[]): string[] {
  const at = args.indexOf(marker);
  if (at < 0 || args.at(-1) !== "--") throw new Error(`bwrap's arguments lack ${marker}`);
  return [...args.slice(0, at), ...extra, ...args.slice(at, -1)];
}

/** bwrap mounts onto "/…" moved under `base` (triples OPTION SOURCE DEST). */
function rebase(mounts: string[], base: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < mounts.length; i += 3) {
    const [option, source, dest] = [mounts[i], mounts[i + 1], mounts[i + 2]];
    if (option === undefined || source === undefined || dest === undefined || !option.endsWith("bind")) {
      throw new Error(`cannot move the root mount ${mounts.join(" ")} under ${base}`);
    }
    out.push(option, source, join(base, dest));
  }
  return out;
}

function size(bytes: number): string[] {
  return bytes > 0 ? ["--size", String(bytes)] : [];
}

/**
 * The secret files bwrap can cover for an action of `uid`/`gid`: existing files below directories that user
 * may search (the others it could not reach, and neither can the action). BubblewrapSandbox does the same
 * for one-shot sandboxes.
 */
export function maskableFiles(paths: readonly string[], uid: number, gid: number): string[] {
  const searchable = (dir: string) => {
    const info = statSync(dir);
    return (
      (info.uid === uid && (info.mode & 0o100) !== 0) ||
      (info.gid === gid && (info.mode & 0o010) !== 0) ||
      (info.mode & 0o001) !== 0
    );
  };
  return paths.filter((path) => {
    try {
      if (!lstatSync(path).isFile()) return false;
      for (let dir = dirname(path); ; dir = dirname(dir)) {
        if (!searchable(dir)) return false;
        if (dir === dirname(dir)) return true;
      }
    } catch {
      return false;
    }
  });
}
