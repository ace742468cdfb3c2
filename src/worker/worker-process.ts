import { type ChildProcess, fork } from "node:child_process";
import { once } from "node:events";
import { fileURLToPath } from "node:url";
import type { Property } from "../action/property.js";
import type { Logger } from "../log/log.js";

export interface WorkerProcessOptions {
  /** The farm to join (scheduler and CAS). */
  address: string;
  /** The farm's worker token file, which the child reads (a secret is never put on a command line). */
  tokenFile: string;
  /** Actions the process runs at once. */
  slots: number;
  workDir: string;
  properties: Property[];
  name: string;
  logLevel: string;
  /** The farm's configuration file, for its `images` section. */
  configFile: string | undefined;
  /** Where the microVM guest is: the farm's worker.vm.dir, else its own <dataDir>/vm (not the worker's default). */
  vmDir: string;
  log: Logger;
}

const MAIN = fileURLToPath(new URL("../cli/main.js", import.meta.url));
const RESTART_DELAY_MS = 1000;

/**
 * `berth serve`'s local workers, as one `berth worker` child process. Node.js
 * runs JavaScript on one thread: workers inside the server would compete
 * with the gRPC services for it, and every sandbox spawn would fork the
 * whole server. The child joins over loopback exactly as a remote worker
 * joins, is restarted if it dies, and exits when the server does (its IPC
 * channel closes even when the server is killed).
 */
export function startWorkerProcess(options: WorkerProcessOptions): { stop(): Promise<void> } {
  let child: ChildProcess | undefined;
  let stopping = false;
  let restartTimer: NodeJS.Timeout | undefined;

  const args = [
    "worker",
    "--scheduler",
    options.address,
    "--token-file",
    options.tokenFile,
    "--slots",
    String(options.slots),
    "--work-dir",
    options.workDir,
    "--name",
    options.name,
    "--log-level",
    options.logLevel,
    ...(options.configFile === undefined ? [] : ["--config", options.configFile]),
    "--vm-dir",
    options.vmDir,
    ...options.properties.flatMap((p) => ["--property", `${p.name}=${p.value}`]),
  ];

  const launch = () => {
    const started = fork(MAIN, args, {
      stdio: ["ignore", "inherit", "inherit", "ipc"],
      // A larger young generation: each action allocates a few short-lived megabytes (messages, buffers).
      execArgv: [...process.execArgv, "--max-semi-space-size=32"],
    });
    child = started;
    started.on("exit", (code, signal) => {
      if (stopping) return;
      options.log.warn(
        { code, signal },
        `the local worker process ${started.pid} exited (${signal ?? `code ${code}`}); restarting it`,
      );
      restartTimer = setTimeout(launch, RESTART_DELAY_MS);
    });
  };
  launch();

  return {
    stop: async () => {
      stopping = true;
      clearTimeout(restartTimer);
      const running = child;
      if (!running || running.exitCode !== null || running.signalCode !== null) return;
      const exited = once(running, "exit");
      running.kill("SIGTERM");
      const timer = setTimeout(() => running.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}
