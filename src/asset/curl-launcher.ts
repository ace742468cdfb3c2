import { type ChildProcess, spawn } from "node:child_process";

/**
 * Starts the curl processes of downloads: `prlimit --fsize=maxBytes+1 curl
 * -q -K -`, each waiting for its whole configuration on standard input
 * (curl-transfer.ts). One is started ahead while nothing downloads, so a
 * download does not wait for curl to be executed and linked (a few
 * milliseconds on a quiet machine, tens on a loaded one); it holds nothing
 * but a pipe until it is given a configuration, and exits when the farm's
 * end of the pipe closes, even if the farm dies.
 */
export class CurlLauncher {
  private spare: ChildProcess | undefined;
  private closed = false;

  constructor(private readonly maxBytes: number) {}

  /** A curl process waiting for its configuration: the one started ahead, or a new one. */
  take(): ChildProcess {
    const child = this.spare ?? startCurl(this.maxBytes);
    this.spare = undefined;
    return child;
  }

  /** Starts the next download's process now, unless one waits already or the launcher is closed. */
  prepare(): void {
    if (this.closed || this.spare) return;
    const child = startCurl(this.maxBytes);
    // A spare that fails to start or dies while waiting is forgotten: the next download starts its own.
    const forget = () => {
      if (this.spare === child) this.spare = undefined;
    };
    child.on("error", forget);
    child.on("exit", forget);
    this.spare = child;
  }

  /** Ends the waiting process; downloads under way are the fetcher's to stop. */
  close(): void {
    this.closed = true;
    this.spare?.kill("SIGKILL");
    this.spare = undefined;
  }
}

function startCurl(maxBytes: number): ChildProcess {
  // prlimit (util-linux) sets RLIMIT_FSIZE and executes curl in its place: the pid is curl's.
  const child = spawn("prlimit", [`--fsize=${maxBytes + 1}`, "curl", "-q", "-K", "-"], {
    stdio: ["pipe", "pipe", "pipe"],
    // Nothing of the farm's environment: no proxy, no CA bundle, no curl home.
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", LC_ALL: "C" },
  });
  child.stdin?.on("error", () => {}); // curl gone early: its exit says why
  return child;
}
