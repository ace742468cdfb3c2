import { join } from "node:path";
import { Command } from "commander";
import type { Property } from "../action/property.js";
import { startServer } from "../api/server.js";
import { TokensFileError } from "../auth/client-tokens.js";
import { PrivateFileError } from "../auth/private-file.js";
import { ConfigError, loadConfig } from "../config/config.js";
import { openFarm } from "../farm/farm.js";
import { createLogger } from "../log/log.js";
import { SERVER_UMASK } from "../store/private-dir.js";
import { guestAssetsDir } from "../vm/guest-assets.js";
import { defaultWorkerCount } from "../worker/local-workers.js";
import { startWorkerProcess } from "../worker/worker-process.js";
import { collectProperty } from "./properties.js";
import { parseCount } from "./worker.js";

export function serveCommand(): Command {
  return new Command("serve")
    .description("run the farm: the REAPI gRPC server and its storage, on embedded defaults unless told otherwise")
    .option("--listen <host:port>", "gRPC address to listen on (default 127.0.0.1:8980)")
    .option("--data-dir <dir>", "directory for all of Berth's data (default ~/.cache/berth)")
    .option("--config <file>", "YAML or JSON configuration file (see README: Configuration)")
    .option("--workers <n>", "local workers to run actions (default: one per core; 0 for none)", parseCount)
    .option(
      "--property <key=value>",
      "a platform property the local workers offer (repeatable); OSFamily, ISA and Arch are offered from the host unless given",
      collectProperty,
      [] as Property[],
    )
    .action(
      async (options: {
        listen?: string;
        dataDir?: string;
        config?: string;
        workers?: number;
        property: Property[];
      }) => {
        let config: Awaited<ReturnType<typeof loadConfig>>;
        try {
          config = await loadConfig(options.config, { listen: options.listen, dataDir: options.dataDir });
        } catch (err) {
          if (err instanceof ConfigError) {
            process.stderr.write(`berth: ${err.message}\n`);
            process.exit(2);
          }
          throw err;
        }
        const log = createLogger(config.logLevel);
        process.umask(SERVER_UMASK);
        // Signals are handled from the start, so one that arrives while the farm starts still stops it cleanly.
        const stoppers: (() => Promise<void>)[] = [];
        let stopping = false;
        const stop = async (signal: string) => {
          stopping = true;
          log.info({ signal }, `received ${signal}; stopping`);
          for (const stopper of stoppers.reverse()) await stopper();
          log.info("stopped");
          process.exit(0);
        };
        process.once("SIGINT", () => void stop("SIGINT"));
        process.once("SIGTERM", () => void stop("SIGTERM"));

        const farm = await openFarm(config, log);
        stoppers.push(() => farm.close());
        let server: Awaited<ReturnType<typeof startServer>>;
        try {
          server = await startServer(farm, config, log);
        } catch (err) {
          if (!(err instanceof PrivateFileError || err instanceof TokensFileError)) throw err;
          process.stderr.write(`berth: ${err.message}\n`);
          await farm.close();
          process.exit(2);
        }
        stoppers.push(() => server.close());
        if (stopping) return;
        const slots = options.workers ?? defaultWorkerCount();
        if (slots > 0) {
          const workers = startWorkerProcess({
            address: server.workerAddress,
            tokenFile: server.workerTokenFile,
            slots,
            workDir: join(config.dataDir, "worker"),
            properties: options.property,
            name: "local",
            logLevel: config.logLevel,
            configFile: options.config,
            // --data-dir is the farm's alone: the child would look for the guest under the default one.
            vmDir: guestAssetsDir(config),
            log,
          });
          stoppers.push(() => workers.stop());
        }
        log.info({ address: server.address, dataDir: config.dataDir }, `berth listening on ${server.address}`);
      },
    );
}
