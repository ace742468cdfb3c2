import type { ServiceError } from "@grpc/grpc-js";
import { Command } from "commander";
import { clientChannel } from "../auth/client-channel.js";
import { PrivateFileError } from "../auth/private-file.js";
import {
  type ExpandImageProgress,
  ImagePullState,
  ImagesClient,
  type PullImageProgress,
} from "../gen/berth/image/v1/image.js";
import { Code } from "../status/status.js";
import { type ConnectionFlags, connectionFrom, withConnectionOptions } from "./connection-options.js";
import { type PullFigures, renderPullProgress, StatusLine } from "./progress-bar.js";

interface PullOptions extends ConnectionFlags {
  server: string;
  instance: string;
}

export function imageCommand(): Command {
  return new Command("image")
    .description("the container images of a farm")
    .addCommand(
      imageSubcommand(
        "pull",
        "have every worker of a farm that runs images pull REF into its image store now, " +
          "so that the first action naming it starts without pulling",
        pull,
      ),
    )
    .addCommand(
      imageSubcommand(
        "expand",
        "expand REF into the farm's CAS as expand mode does (warming it ahead of a build) " +
          "and print the digest of the image's root directory",
        expand,
      ),
    );
}

/** `berth image NAME [--server] [--instance] REF`, exiting with what `run` returns. */
function imageSubcommand(
  name: string,
  description: string,
  run: (reference: string, options: PullOptions) => Promise<number>,
): Command {
  const command = new Command(name)
    .description(description)
    .option("--server <host:port>", "the farm's gRPC address; grpcs://HOST:PORT for TLS", "127.0.0.1:8980")
    .option("--instance <name>", "REAPI instance name", "");
  return withConnectionOptions(command)
    .argument("<ref>", "the image, as in the container-image property (docker:// optional)")
    .action(async (reference: string, options: PullOptions) => {
      process.exitCode = await run(reference, options).catch((err: unknown) => {
        if (!(err instanceof PrivateFileError)) throw err;
        process.stderr.write(`berth image ${name}: ${err.message}\n`);
        return 2;
      });
    });
}

/** Follows the expansion with a bar on a terminal, then prints `HASH/SIZE` of the root directory. */
async function expand(reference: string, options: PullOptions): Promise<number> {
  const client = await imagesClient(options);
  const line = process.stderr.isTTY ? new StatusLine(process.stderr) : undefined;
  let last: ExpandImageProgress | undefined;
  try {
    for await (const message of client.expandImage({ instanceName: options.instance, reference })) {
      last = message as ExpandImageProgress;
      if (line) line.draw(renderPullProgress(last, process.stderr.columns || 80));
    }
  } catch (err) {
    line?.clear();
    process.stderr.write(`berth image expand: ${messageOf(err)}\n`);
    return 1;
  } finally {
    client.close();
  }
  line?.clear();
  const root = last?.rootDirectoryDigest;
  if (!last || !root) {
    process.stderr.write("berth image expand: the farm ended the expansion without a root directory\n");
    return 1;
  }
  process.stderr.write(
    `berth image expand: ${last.reference.includes("@") ? last.reference : `${last.reference}@${last.manifestDigest}`}\n`,
  );
  process.stdout.write(`${root.hash}/${root.sizeBytes}\n`);
  return 0;
}

/**
 * Follows the farm's pull, with a bar on a terminal (a line per finished
 * worker otherwise), then prints one line per worker on standard output.
 * The exit code is 0 only when every worker has the image.
 */
async function pull(reference: string, options: PullOptions): Promise<number> {
  const client = await imagesClient(options);
  const workers = new Map<string, ImagePullState>();
  const line = process.stderr.isTTY ? new StatusLine(process.stderr) : undefined;
  try {
    for await (const message of client.pullImage({ instanceName: options.instance, reference })) {
      const { workerName, state: progress = ImagePullState.fromPartial({}) } = message as PullImageProgress;
      const finishedNow = progress.finished && !workers.get(workerName)?.finished;
      workers.set(workerName, progress);
      if (line) line.draw(renderPullProgress(figuresOf(workers.values()), process.stderr.columns || 80));
      else if (finishedNow) process.stderr.write(`berth image pull: ${workerName} ${outcomeOf(progress)}\n`);
    }
  } catch (err) {
    line?.clear();
    process.stderr.write(`berth image pull: ${messageOf(err)}\n`);
    return 1;
  } finally {
    client.close();
  }
  line?.clear();
  if (workers.size === 0) {
    process.stderr.write("berth image pull: the farm named no worker\n");
    return 1;
  }
  const names = [...workers.keys()].sort();
  const width = Math.max(...names.map((name) => name.length));
  let succeeded = true;
  for (const name of names) {
    const progress = workers.get(name) as ImagePullState;
    succeeded &&= progress.finished && progress.status?.code === Code.OK;
    process.stdout.write(`${name.padEnd(width)}  ${outcomeOf(progress)}\n`);
  }
  return succeeded ? 0 : 1;
}

function figuresOf(states: Iterable<ImagePullState>): PullFigures {
  const figures = { bytesDone: 0, bytesTotal: 0, layersDone: 0, layersTotal: 0, workersFinished: 0, workersTotal: 0 };
  for (const state of states) {
    figures.bytesDone += state.bytesDone;
    figures.bytesTotal += state.bytesTotal;
    figures.layersDone += state.layersDone;
    figures.layersTotal += state.layersTotal;
    figures.workersFinished += state.finished ? 1 : 0;
    figures.workersTotal++;
  }
  return figures;
}

/** `REFERENCE@DIGEST`, or `failed: WHY`. */
function outcomeOf(progress: ImagePullState): string {
  if (!progress.finished) return "failed: the farm ended the pull before this worker finished";
  if (progress.status?.code !== Code.OK) {
    return `failed: ${progress.status?.message || `status ${progress.status?.code ?? "missing"}`}`;
  }
  const { reference, manifestDigest } = progress;
  return reference.includes("@") ? reference : `${reference}@${manifestDigest}`;
}

function messageOf(err: unknown): string {
  const details = (err as Partial<ServiceError>).details;
  return typeof details === "string" && details !== "" ? details : (err as Error).message;
}

async function imagesClient(options: PullOptions): Promise<ImagesClient> {
  const channel = clientChannel(await connectionFrom(options.server, options));
  return new ImagesClient(channel.target, channel.credentials, channel.options);
}
