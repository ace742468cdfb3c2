import { spawn } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { LaunchedProcess, ProcessExit, WorkerLaunch, WorkerProcessLauncher } from "./launcher.js";

/**
 * Starts worker processes on the host with node:child_process, each in a
 * fresh directory below `baseDir` (removed when it exits). No isolation: for
 * tests and benchmarks; BwrapLauncher starts the same process in a sandbox.
 */
export class ChildProcessLauncher implements WorkerProcessLauncher {
  constructor(private readonly baseDir: string) {}

  launch(launch: WorkerLaunch, prepare?: (inputRoot: string) => Promise<void>): Promise<LaunchedProcess> {
    return launchInDirectory(this.baseDir, launch, prepare, (inputRoot) => ({
      argv: [...launch.argv],
      cwd: join(inputRoot, launch.workingDirectory),
      env: { ...launch.env },
    }));
  }
}

/** What is spawned for a launch, once its input root exists. */
export interface SpawnPlan {
  argv: string[];
  cwd: string;
  env: Record<string, string>;
  /** Pipes to open past stderr (fd 3 on), whose output is read and dropped (bwrap's status). */
  extraPipes?: number;
}

/**
 * Makes a fresh input root below `baseDir`, has `prepare` fill it, spawns what `plan` says in a process group
 * of its own (killing the group kills what the process started too) and removes the input root once the
 * process and every holder of its pipes are gone. Nothing is left behind when any step fails.
 */
export async function launchInDirectory(
  baseDir: string,
  launch: WorkerLaunch,
  prepare: ((inputRoot: string) => Promise<void>) | undefined,
  plan: (inputRoot: string) => SpawnPlan,
): Promise<LaunchedProcess> {
  const inputRoot = await mkdtemp(join(baseDir, "worker-"));
  try {
    await prepare?.(inputRoot);
    await mkdir(join(inputRoot, launch.workingDirectory), { recursive: true });
    const { argv, cwd, env, extraPipes = 0 } = plan(inputRoot);
    const [program, ...args] = argv;
    if (program === undefined) throw new Error("a worker process needs a program to start");
    const stdio = Array.from({ length: 3 + extraPipes }, () => "pipe" as const);
    const child = spawn(program, args, { cwd, env, stdio, detached: true });
    for (const extra of child.stdio.slice(3)) {
      extra?.on("error", () => {});
      if (extra && "resume" in extra) extra.resume();
    }
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

function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    // Already gone.
  }
}
