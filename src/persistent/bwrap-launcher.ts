import { chmod } from "node:fs/promises";
import { posix } from "node:path";
import { INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { DEFAULT_USER, sandboxArgs } from "../sandbox/bwrap-args.js";
import type { SandboxUser } from "../sandbox/sandbox.js";
import { launchInDirectory } from "./child-process-launcher.js";
import type { LaunchedProcess, WorkerLaunch, WorkerProcessLauncher } from "./launcher.js";

export interface BwrapLauncherOptions {
  bwrapPath?: string;
  /** The ids inside the user namespace (nobody unless told). */
  user?: SandboxUser;
  /** Sizes of the private /tmp and /dev/shm; 0: the kernel's default. */
  tmpSizeBytes?: number;
  shmSizeBytes?: number;
  /** Host directories covered by an empty tmpfs, besides /run and `baseDir` (where the other processes' input roots are). */
  hide?: string[];
}

/** bwrap's --json-status-fd: a pipe whose reports the pool drops (the process's exit is seen on its own). */
const STATUS_FD = 3;

/**
 * Starts each worker process in a bubblewrap sandbox of its own, laid out as
 * the host-root sandbox lays out an action's (src/sandbox/bwrap-args.ts): the
 * host's root read-only, /run and `baseDir` hidden (so the other processes'
 * input roots are), private /tmp and /dev/shm, no network,
 * its own pid namespace (it dies with bwrap), and its input root, a fresh
 * directory below `baseDir`, bound writable at /run/berth/execroot. The
 * process keeps that path for its whole life; each request's inputs are laid
 * out in the same directory. It runs as the worker's own host user (no slot
 * uid, cgroup or resource limits): those are the runner's to add.
 */
export class BwrapLauncher implements WorkerProcessLauncher {
  constructor(
    private readonly baseDir: string,
    private readonly options: BwrapLauncherOptions = {},
  ) {}

  launch(launch: WorkerLaunch, prepare?: (inputRoot: string) => Promise<void>): Promise<LaunchedProcess> {
    return launchInDirectory(
      this.baseDir,
      launch,
      async (inputRoot) => {
        // The sandbox's user must reach the directory bwrap binds.
        await chmod(inputRoot, 0o755);
        await prepare?.(inputRoot);
      },
      (inputRoot) => {
        const env = Object.entries(launch.env).map(([name, value]) => ({ name, value }));
        const args = sandboxArgs(
          { env, network: false },
          {
            root: ["--ro-bind", "/", "/"],
            hide: ["/run", this.baseDir, ...(this.options.hide ?? [])],
            inputSource: inputRoot,
            inputMount: INPUT_ROOT_MOUNT,
            workDirInRoot: posix.normalize(launch.workingDirectory),
            user: this.options.user ?? DEFAULT_USER,
            statusFd: STATUS_FD,
            tmpSizeBytes: this.options.tmpSizeBytes ?? 0,
            shmSizeBytes: this.options.shmSizeBytes ?? 0,
            command: [...launch.argv],
          },
        );
        return { argv: [this.options.bwrapPath ?? "bwrap", ...args], cwd: "/", env: {}, extraPipes: 1 };
      },
    );
  }
}
