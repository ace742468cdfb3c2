import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Clients, connect, spawnBerth } from "../test/support/farm.js";
import { ownCpuSeconds, processCpuSeconds } from "./machine.js";

/** `berth serve` in its own process, with a client connected to it. */
export interface BenchServer {
  readonly address: string;
  /** The server's data directory. */
  readonly dataDir: string;
  readonly pid: number | undefined;
  readonly clients: Clients;
  /** Closes the client, then stops the server (SIGTERM); safe to call twice. */
  stop(): Promise<void>;
}

export interface BenchServerOptions {
  /** Directory for the config file and the server's data (its own subdirectory). */
  workDir: string;
  casMaxSizeBytes: string;
  /** When set, the server writes a V8 CPU profile into this directory as it exits. */
  cpuProfileDir?: string;
  /** Local workers (`--workers N`, one slot each); when unset, berth serve's default of one per core. */
  workers?: number;
  /** images.mode; berth serve's default (mount) when unset. */
  imageMode?: "mount" | "expand";
  /** Sees each line of the server's log (pino JSON), from the first. */
  onLogLine?: (line: string) => void;
  /** More top-level YAML sections for the config file (e.g. the asset API's fetch policy). */
  extraConfig?: string;
}

export async function startBenchServer(options: BenchServerOptions): Promise<BenchServer> {
  const configFile = join(options.workDir, "berth.yaml");
  const dataDir = join(options.workDir, "data");
  const images = options.imageMode === undefined ? "" : `images:\n  mode: ${options.imageMode}\n`;
  await writeFile(
    configFile,
    `cas:\n  maxSizeBytes: ${options.casMaxSizeBytes}\n${images}${options.extraConfig ?? ""}`,
  );
  const args = ["--config", configFile, "--data-dir", dataDir];
  if (options.workers !== undefined) args.push("--workers", String(options.workers));
  // Node refuses --cpu-prof in NODE_OPTIONS, so a profiled server is started with the flag itself.
  const nodeFlags =
    options.cpuProfileDir === undefined ? [] : ["--cpu-prof", `--cpu-prof-dir=${options.cpuProfileDir}`];
  const berth = await spawnBerth(args, nodeFlags, options.onLogLine);
  const clients = connect(berth.address);
  let stopping: Promise<void> | undefined;
  return {
    address: berth.address,
    dataDir,
    pid: berth.child.pid,
    clients,
    stop: () => {
      stopping ??= (async () => {
        clients.close();
        const timer = setTimeout(() => berth.child.kill("SIGKILL"), 15_000);
        await berth.stop();
        clearTimeout(timer);
      })();
      return stopping;
    },
  };
}

/** CPU seconds used by the server and by this (client) process while `work` ran. */
export interface CpuUse {
  server: number;
  client: number;
}

export async function measureCpu<T>(serverPid: number | undefined, work: () => Promise<T>): Promise<[T, CpuUse]> {
  const server0 = processCpuSeconds(serverPid);
  const client0 = ownCpuSeconds();
  const result = await work();
  return [result, { server: processCpuSeconds(serverPid) - server0, client: ownCpuSeconds() - client0 }];
}
