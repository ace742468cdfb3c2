import { mkdir } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import type { ServiceError } from "@grpc/grpc-js";
import { Command } from "commander";
import type { Property } from "../action/property.js";
import { clientChannel } from "../auth/client-channel.js";
import { PrivateFileError } from "../auth/private-file.js";
import { type Digest, digestOf, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import {
  Action,
  Directory,
  ExecuteOperationMetadata,
  ExecuteResponse,
  ExecutionClient,
  ExecutionStage_Value,
  Command as RemoteCommand,
  Tree,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { readLocalTree } from "../merkle/local-tree.js";
import { Code } from "../status/status.js";
import { CHANNEL_OPTIONS, RemoteCas } from "../worker/remote-cas.js";
import { type ConnectionFlags, connectionFrom, withConnectionOptions } from "./connection-options.js";
import { collectProperty } from "./properties.js";

interface RunOptions extends ConnectionFlags {
  server: string;
  input?: string;
  platform: Property[];
  env: Property[];
  output: string[];
  timeout?: string;
  instanceName: string;
}

export function runCommand(): Command {
  const command = new Command("run")
    .description("run one command on a farm: upload a directory, execute remotely, print its output, fetch its outputs")
    .usage("[options] -- COMMAND [ARGS...]")
    .option("--server <host:port>", "the farm's gRPC address; grpcs://HOST:PORT for TLS", "127.0.0.1:8980")
    .option("--input <dir>", "directory uploaded as the input root (default: an empty one)")
    .option(
      "--platform <key=value>",
      "a platform property, e.g. container-image=docker://… (repeatable)",
      collectProperty,
      [],
    )
    .option(
      "--env <name=value>",
      "an environment variable of the command (repeatable; default PATH only)",
      collectProperty,
      [],
    )
    .option(
      "--output <path>",
      "an output to fetch into the current directory (repeatable)",
      (v: string, p: string[]) => [...p, v],
      [],
    )
    .option("--timeout <seconds>", "the action's timeout")
    .option("--instance-name <name>", "REAPI instance name", "");
  return withConnectionOptions(command)
    .argument("<command...>", "the command and its arguments")
    .action(async (argv: string[], options: RunOptions) => {
      process.exitCode = await run(argv, options).catch((err: unknown) => {
        if (err instanceof PrivateFileError) {
          process.stderr.write(`berth run: ${err.message}\n`);
          return 2;
        }
        // A refused call (no or a wrong token, a TLS failure) is told in one line, not as a stack trace.
        const { code, details } = err as Partial<ServiceError>;
        if (typeof code !== "number") throw err;
        const name = Object.entries(Code).find(([, value]) => value === code)?.[0] ?? `status ${code}`;
        process.stderr.write(`berth run: ${name}: ${details ?? (err as Error).message}\n`);
        return 1;
      });
    });
}

async function run(argv: string[], options: RunOptions): Promise<number> {
  const fn = SHA256;
  const channel = clientChannel(await connectionFrom(options.server, options), CHANNEL_OPTIONS);
  const cas = RemoteCas.connect(channel).withInstance(options.instanceName);
  const execution = new ExecutionClient(channel.target, channel.credentials, channel.options);
  try {
    // Without --input the input root is the empty Directory, whose encoding is the empty blob.
    const tree = options.input
      ? await readLocalTree(fn, resolve(options.input))
      : { rootDigest: await digestOf(fn, Buffer.alloc(0)), blobs: [] };
    const env = options.env.length > 0 ? options.env : [{ name: "PATH", value: "/usr/local/bin:/usr/bin:/bin" }];
    const command = RemoteCommand.fromPartial({
      arguments: argv,
      environmentVariables: [...env].sort((a, b) => (a.name < b.name ? -1 : 1)),
      outputPaths: options.output,
      platform: { properties: sortedProperties(options.platform) },
    });
    const commandBytes = Buffer.from(RemoteCommand.encode(command).finish());
    const commandDigest = await digestOf(fn, commandBytes);
    const timeout = options.timeout === undefined ? undefined : { seconds: Number(options.timeout), nanos: 0 };
    const action = Action.fromPartial({
      commandDigest: wire(commandDigest),
      inputRootDigest: wire(tree.rootDigest),
      timeout,
      platform: { properties: sortedProperties(options.platform) },
    });
    const actionBytes = Buffer.from(Action.encode(action).finish());
    const actionDigest = await digestOf(fn, actionBytes);
    await cas.upload([
      ...tree.blobs,
      { digest: commandDigest, data: commandBytes },
      { digest: actionDigest, data: actionBytes },
    ]);

    const response = await follow(execution, options.instanceName, actionDigest);
    const status = response.status;
    const result = response.result;
    if (result) {
      const logs = await cas.readBlobs(
        [result.stdoutDigest, result.stderrDigest].filter(isDigest).map((d) => parseDigest(fn, d, "log")),
      );
      for (const [digest, data] of logs) {
        (digest.hash === result.stdoutDigest?.hash ? process.stdout : process.stderr).write(data);
      }
      await fetchOutputs(cas, fn, result);
    }
    if (status && status.code !== 0) {
      process.stderr.write(`berth run: ${status.message || `failed with status ${status.code}`}\n`);
      return result?.exitCode || 1;
    }
    return result?.exitCode ?? 1;
  } finally {
    cas.close();
    execution.close();
  }
}

/** Follows the Execute stream, telling the stage on standard error as it changes. */
async function follow(client: ExecutionClient, instanceName: string, actionDigest: Digest): Promise<ExecuteResponse> {
  let last = -1;
  for await (const operation of client.execute({
    instanceName,
    skipCacheLookup: false,
    actionDigest: wire(actionDigest),
    executionPolicy: undefined,
    resultsCachePolicy: undefined,
    digestFunction: actionDigest.fn.wireValue,
    inlineStdout: false,
    inlineStderr: false,
    inlineOutputFiles: [],
  })) {
    const metadata = operation.metadata ? ExecuteOperationMetadata.decode(operation.metadata.value) : undefined;
    if (metadata && metadata.stage !== last) {
      last = metadata.stage;
      process.stderr.write(`berth run: ${ExecutionStage_Value[metadata.stage]?.toLowerCase().replace("_", " ")}\n`);
    }
    if (operation.done && operation.response) return ExecuteResponse.decode(operation.response.value);
  }
  throw new Error("the farm closed the Execute stream before the action completed");
}

async function fetchOutputs(
  cas: RemoteCas,
  fn: typeof SHA256,
  result: ExecuteResponse["result"] & object,
): Promise<void> {
  const files: { path: string; digest: Digest }[] = result.outputFiles.map((f) => ({
    path: f.path,
    digest: parseDigest(fn, f.digest, f.path),
  }));
  for (const dir of result.outputDirectories) {
    const treeDigest = parseDigest(fn, dir.treeDigest, dir.path);
    const tree = Tree.decode((await cas.readBlobs([treeDigest])).get(treeDigest) ?? Buffer.alloc(0));
    const children = new Map<string, Directory>();
    for (const child of tree.children) {
      children.set((await digestOf(fn, Directory.encode(child).finish())).hash, child);
    }
    const walk = (directory: Directory | undefined, prefix: string) => {
      if (!directory) return;
      for (const f of directory.files)
        files.push({ path: `${prefix}/${f.name}`, digest: parseDigest(fn, f.digest, f.name) });
      for (const d of directory.directories) walk(children.get(d.digest?.hash ?? ""), `${prefix}/${d.name}`);
    };
    walk(tree.root, dir.path);
  }
  for (const { path, digest } of files) {
    const target = resolve(path);
    await mkdir(dirname(target), { recursive: true });
    if (!(await cas.readToFile(digest, target))) throw new Error(`output ${path} is not in the CAS`);
  }
}

function sortedProperties(properties: Property[]): Property[] {
  return [...properties].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.value < b.value ? -1 : 1));
}

function isDigest(d: { hash: string; sizeBytes: number } | undefined): d is { hash: string; sizeBytes: number } {
  return d !== undefined;
}

function wire(d: Digest): { hash: string; sizeBytes: number } {
  return { hash: d.hash, sizeBytes: d.sizeBytes };
}
