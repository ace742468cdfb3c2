import { spawn } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { LaunchedProcess, ProcessExit, WorkerLaunch, WorkerProcessLauncher } from "./launcher.js";

/**
 * Starts worker processes on the host with node:child_process, each in a
 * fresh directory below `baseDir` (removed when it exits) and in a process
 * group of its own, so that killing it kills what it started too. No
 * isolation: for tests and benchmarks; the worker's action path gives the
 * pool a launcher that starts the process in its runner's sandbox.
 */
export class ChildProcessLauncher implements WorkerProcessLauncher {
  constructor(private readonly baseDir: string) {}

  async launch(launch: WorkerLaunch, prepare?: (inputRoot: string) => Promise<void>): Promise<LaunchedProcess> {
    const [program, ...args] = launch.argv;
    if (program === undefined) throw new Error("a worker process needs a program to start");
    const inputRoot = await mkdtemp(join(this.baseDir, "worker-"));
    const cwd = join(inputRoot, launch.workingDirectory);
    try {
      await prepare?.(inputRoot);
      await mkdir(cwd, { recursive: true });
      const child = spawn(program, args, {
        cwd,
        env: { ...launch.env },
        stdio: ["pipe", "pipe", "pipe"],
        detached: true,
      });
      await new Promise<void>((resolve, reject) => {
        child.once("spawn", resolve);
        child.once("error", reject);
      });
      const pid = child.pid as number;
      const exited = new Promise<ProcessExit>((resolve) => {
        // What the process started may outlive it: the whole group goes, which also closes the pipes they
        // share, so that "close" (after the last of stdout was read) follows.
        child.once("exit", () => killGroup(pid));
        child.once("close", (code, signal) => {
          void rm(inputRoot, { recursive: true, force: true })
            .catch(() => {})
            .then(() => resolve({ code, signal }));
        });
      });
      // A pipe broken by the process's death is seen through `exited`, not as an unhandled error.
      for (const stream of [child.stdin, child.stdout, child.stderr]) stream.on("error", () => {});
      return {
        pid,
        inputRoot,
        stdin: child.stdin,
        stdout: child.stdout,
        stderr: child.stderr,
        exited,
        kill: () => killGroup(pid),
      };
    } catch (err) {
      await rm(inputRoot, { recursive: true, force: true });
      throw err;
    }
  }
}

function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    // Already gone.
  }
}
