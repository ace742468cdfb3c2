import { homedir } from "node:os";
import { join } from "node:path";
import { Command, InvalidArgumentError } from "commander";
import type { Property } from "../action/property.js";
import type { ConnectionOptions } from "../auth/client-channel.js";
import { PrivateFileError, secretFilePaths } from "../auth/private-file.js";
import { type Config, ConfigError, loadConfig } from "../config/config.js";
import { createLogger } from "../log/log.js";
import { WORKER_UMASK } from "../store/private-dir.js";
import { guestAssetsDir } from "../vm/guest-assets.js";
import { defaultWorkerCount, startWorkers } from "../worker/local-workers.js";
import { type ConnectionFlags, connectionFrom, withConnectionOptions } from "./connection-options.js";
import { collectProperty } from "./properties.js";

export function workerCommand(): Command {
  const command = new Command("worker")
    .description("join a farm as a worker: run the actions its scheduler assigns, in a bubblewrap sandbox")
    .requiredOption("--scheduler <host:port>", "the farm's gRPC address (its scheduler and CAS); grpcs://… for TLS")
    .option("--name <name>", "worker name prefix, unique in the farm (default: host name and pid)")
    .option("--slots <n>", "actions run at once (default: one per core)", parseCount)
    .option("--work-dir <dir>", "directory for the file cache and the actions (default ~/.cache/berth/worker)")
    .option(
      "--property <key=value>",
      "a platform property this worker offers (repeatable); OSFamily, ISA and Arch are offered from the host unless given",
      collectProperty,
      [] as Property[],
    )
    .option("--config <file>", "YAML or JSON configuration file; its `images` and `worker` sections apply (see README)")
    .option(
      "--vm-dir <dir>",
      "the microVM guest (scripts/guest-assets.sh DIR); default worker.vm.dir, else <dataDir>/vm",
    )
    .option("--log-level <level>", "trace, debug, info, warn, error or silent", "info");
  return withConnectionOptions(
    command,
    "the worker token (DATA/worker-token of the farm, or one of auth.workerTokenFiles)",
  ).action(
    async (
      options: {
        scheduler: string;
        name?: string;
        slots?: number;
        workDir?: string;
        property: Property[];
        config?: string;
        vmDir?: string;
        logLevel: string;
      } & ConnectionFlags,
    ) => {
      const log = createLogger(options.logLevel);
      // Set, not inherited: `berth serve` (which starts local workers) runs with a stricter one.
      process.umask(WORKER_UMASK);
      if (options.tokenFile === undefined && options.tlsCert === undefined) {
        process.stderr.write(
          "berth worker: give --token-file (or --tls-cert for a farm that knows its workers by certificate): " +
            "the farm accepts only workers it knows\n",
        );
        process.exit(2);
      }
      let config: Config;
      let connection: ConnectionOptions;
      try {
        config = await loadConfig(options.config);
        connection = await connectionFrom(options.scheduler, options);
      } catch (err) {
        if (!(err instanceof ConfigError || err instanceof PrivateFileError || isFileError(err))) throw err;
        process.stderr.write(`berth: ${(err as Error).message}\n`);
        process.exit(2);
      }
      const pool = await startWorkers({
        connection,
        count: options.slots ?? defaultWorkerCount(),
        workDir: options.workDir ?? join(homedir(), ".cache", "berth", "worker"),
        properties: options.property,
        name: options.name,
        images: config.images,
        worker: config.worker,
        inputLimits: config.execution.inputLimits,
        // Started by `berth serve`, the worker has the farm's configuration and masks the server's secrets too.
        maskedFiles: secretFilePaths(config, options.config, options),
        vmAssetsDir: options.vmDir ?? guestAssetsDir(config),
        log,
      });
      log.info(`berth worker joined ${options.scheduler}`);
      const stop = async (signal: string) => {
        log.info({ signal }, `received ${signal}; stopping`);
        await pool.stop();
        process.exit(0);
      };
      process.once("SIGINT", () => void stop("SIGINT"));
      process.once("SIGTERM", () => void stop("SIGTERM"));
      // Started by `berth serve`: the IPC channel closes when the server exits, however it exits.
      if (process.send) process.once("disconnect", () => void stop("disconnect"));
    },
  );
}

function isFileError(err: unknown): boolean {
  return typeof (err as NodeJS.ErrnoException).code === "string" || (err as Error).message?.startsWith("--tls");
}

export function parseCount(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`"${value}" is not a whole number`);
  return n;
}
