import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { type RunningServer, startServer } from "../../src/api/server.js";
import { type ConnectionOptions, clientChannel } from "../../src/auth/client-channel.js";
import { readTokenFile } from "../../src/auth/token-file.js";
import { type Config, parseConfig } from "../../src/config/config.js";
import { type Farm, openFarm } from "../../src/farm/farm.js";
import { FetchClient, PushClient } from "../../src/gen/build/bazel/remote/asset/v1/remote_asset.js";
import {
  ActionCacheClient,
  CapabilitiesClient,
  ContentAddressableStorageClient,
  ExecutionClient,
} from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { ByteStreamClient } from "../../src/gen/google/bytestream/bytestream.js";
import { OperationsClient } from "../../src/gen/google/longrunning/operations.js";
import { type Logger, silentLogger } from "../../src/log/log.js";
import { startWorkers } from "../../src/worker/local-workers.js";

/** Real gRPC clients of every service, connected to one address. */
export interface Clients {
  execution: ExecutionClient;
  operations: OperationsClient;
  cas: ContentAddressableStorageClient;
  byteStream: ByteStreamClient;
  ac: ActionCacheClient;
  capabilities: CapabilitiesClient;
  /** The Remote Asset API. */
  fetch: FetchClient;
  push: PushClient;
  close(): void;
}

const CHANNEL_OPTIONS = {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
  // The receive window grpc-java (Bazel's gRPC) opens by default; grpc-js's own is 64 KiB.
  "grpc-node.flow_control_window": 1024 * 1024,
};

/** Clients of every service; `as` adds a token, headers or TLS (as `berth run` would send them). */
export function connect(address: string, as: Omit<ConnectionOptions, "address"> = {}): Clients {
  const { target, credentials, options } = clientChannel({ ...as, address }, CHANNEL_OPTIONS);
  const cas = new ContentAddressableStorageClient(target, credentials, options);
  const byteStream = new ByteStreamClient(target, credentials, options);
  const ac = new ActionCacheClient(target, credentials, options);
  const capabilities = new CapabilitiesClient(target, credentials, options);
  const execution = new ExecutionClient(target, credentials, options);
  const operations = new OperationsClient(target, credentials, options);
  const fetch = new FetchClient(target, credentials, options);
  const push = new PushClient(target, credentials, options);
  return {
    execution,
    operations,
    cas,
    byteStream,
    ac,
    capabilities,
    fetch,
    push,
    close: () => {
      for (const client of [cas, byteStream, ac, capabilities, execution, operations, fetch, push]) client.close();
    },
  };
}

/** A farm in this process on a free loopback port, with a fresh data directory. */
export interface TestFarm {
  readonly address: string;
  /** The server's own worker secret (DATA/worker-token), which its workers present. */
  readonly workerToken: string;
  readonly config: Config;
  readonly clients: Clients;
  readonly farm: Farm;
  /** Stops and starts the server on the same data directory (a new port). */
  restart(): Promise<TestFarm>;
  close(): Promise<void>;
}

export interface TestFarmOptions {
  /** Local workers to start (each one slot), connected over gRPC as in `berth serve`. */
  workers?: number;
  /** Platform properties those workers offer. */
  properties?: { name: string; value: string }[];
  /** false: the workers run no container images (by default they do, when the tests run as root). */
  runImages?: boolean;
  /** What `clients` present (a token, TLS roots); none by default. */
  clientConnection?: Omit<ConnectionOptions, "address">;
  /** Where the farm logs (silent by default). */
  log?: Logger;
}

let farmsStarted = 0;

/**
 * A range of 16 sandbox uids for one test farm: test files run in parallel processes, and farms sharing a
 * slot's uid would share its RLIMIT_NPROC count.
 */
export function testUidBase(): number {
  return 2_100_000_000 + (process.pid % 1_000_000) * 256 + (farmsStarted++ % 16) * 16;
}

export async function startTestFarm(
  settings: Record<string, unknown> = {},
  dataDir?: string,
  options: TestFarmOptions = {},
): Promise<TestFarm> {
  const dir = dataDir ?? (await mkdtemp(join(tmpdir(), "berth-test-")));
  const worker = { sandboxUidBase: testUidBase(), ...(settings.worker as Record<string, unknown> | undefined) };
  const config = parseConfig({ listen: "127.0.0.1:0", dataDir: dir, logLevel: "silent", ...settings, worker });
  const log = options.log ?? silentLogger();
  const farm = await openFarm(config, log);
  const server: RunningServer = await startServer(farm, config, log);
  const workerToken = await readTokenFile(server.workerTokenFile);
  const clients = connect(server.address, options.clientConnection);
  const workers =
    (options.workers ?? 0) > 0
      ? await startWorkers({
          connection: { address: server.workerAddress, token: workerToken },
          images: config.images,
          worker: config.worker,
          inputLimits: config.execution.inputLimits,
          runImages: options.runImages,
          count: options.workers ?? 0,
          workDir: join(dir, "worker"),
          properties: options.properties ?? [],
          name: "test",
          // Only a farm configured with a guest (worker.vm.dir) runs VMs: the others never probe QEMU.
          vmAssetsDir: config.worker.vm.dir,
          log,
        })
      : undefined;
  const stop = async () => {
    clients.close();
    await workers?.stop();
    await server.close();
    await farm.close();
  };
  return {
    address: server.address,
    workerToken,
    config,
    clients,
    farm,
    restart: async () => {
      await stop();
      return startTestFarm(settings, dir, options);
    },
    close: async () => {
      await stop();
      if (dataDir === undefined) await rm(dir, { recursive: true, force: true });
    },
  };
}

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

/** The compiled `berth` program of this checkout. */
export const BERTH_BIN = join(REPO_ROOT, "dist", "src", "cli", "main.js");

/** A server in a child process, as a user starts it. */
export interface ServerProcess {
  readonly address: string;
  readonly child: ChildProcess;
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>;
}

/**
 * Starts `node ARGS…` and resolves once a line of its standard output matches
 * `listening` (whose first group is the address).
 */
export async function spawnListening(
  nodeArgs: string[],
  listening: RegExp,
  what: string,
  onLine?: (line: string) => void,
): Promise<ServerProcess> {
  const child = spawn(process.execPath, nodeArgs, { stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream });
  if (onLine) lines.on("line", onLine);
  const address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not start within 20 s`)), 20_000);
    child.once("exit", (code) => reject(new Error(`${what} exited with ${code} before listening`)));
    lines.on("line", (line) => {
      const match = listening.exec(line);
      if (match?.[1]) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
  });
  return {
    address,
    child,
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve(child.exitCode);
        child.once("exit", (code) => resolve(code));
        child.kill("SIGTERM");
      }),
  };
}

/**
 * `berth serve` on a free loopback port; `nodeFlags` go to node itself (e.g. --cpu-prof); `onLine` sees each
 * line of its log from the first.
 */
export function spawnBerth(
  args: string[] = [],
  nodeFlags: string[] = [],
  onLine?: (line: string) => void,
): Promise<ServerProcess> {
  return spawnListening(
    [...nodeFlags, BERTH_BIN, "serve", "--listen", "127.0.0.1:0", ...args],
    /berth listening on (\S+?)"/,
    "berth serve",
    onLine,
  );
}
