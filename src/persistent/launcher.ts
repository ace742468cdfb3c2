/**
 * How a worker process is started: the pool asks a WorkerProcessLauncher,
 * which decides where the process runs (on the host here; in a sandbox for
 * the worker's action path) and gives back its three pipes.
 */
import type { Readable, Writable } from "node:stream";

/** What to start. */
export interface WorkerLaunch {
  /** The start-up arguments (argv[0] is the program), `--persistent_worker` included. */
  argv: readonly string[];
  env: Readonly<Record<string, string>>;
  /** The process's working directory, relative to its input root (Command.working_directory). */
  workingDirectory: string;
}

export interface ProcessExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A process started by a launcher. */
export interface LaunchedProcess {
  readonly pid: number;
  /**
   * The host directory that is the process's input root for as long as it runs: each request's inputs are
   * laid out there before the request is written (it never changes, since a process cannot change directory).
   */
  readonly inputRoot: string;
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Settles (never rejects) once the process has exited and its input root is gone. */
  readonly exited: Promise<ProcessExit>;
  /** Kills the process and everything it started; `exited` settles after. */
  kill(): void;
}

export interface WorkerProcessLauncher {
  /**
   * Makes the process's input root, has `prepare` lay out the first request's inputs there (the tool's files
   * are among them, and must be there before the tool starts), then starts the process. Rejects, leaving
   * nothing running and nothing behind, when any of it fails.
   */
  launch(launch: WorkerLaunch, prepare?: (inputRoot: string) => Promise<void>): Promise<LaunchedProcess>;
}
