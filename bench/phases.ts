/** Checking an Execute's outcome and splitting its time into phases, for the execution and image benchmarks. */
import type {
  ExecutedActionMetadata,
  ExecuteResponse,
} from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Timestamp } from "../src/gen/google/protobuf/timestamp.js";
import type { WireDigest } from "../test/support/blobs.js";
import { fmt, median } from "./stats.js";

/** Throws unless the action ran (not from the cache), exited 0 and, when given, printed `stdout`. */
export function checkCompleted(response: ExecuteResponse, what: string, stdout?: WireDigest): void {
  const code = response.status?.code ?? 0;
  if (code !== 0) throw new Error(`${what} failed: ${code} ${response.status?.message}`);
  if (response.result?.exitCode !== 0) throw new Error(`${what} exited with ${response.result?.exitCode}`);
  if (response.cachedResult) throw new Error(`${what} came from the action cache`);
  if (stdout !== undefined && response.result.stdoutDigest?.hash !== stdout.hash) {
    throw new Error(`${what} printed something else than expected`);
  }
}

/** A protobuf Timestamp in ms since the epoch; NaN when absent. */
export function ms(timestamp: Timestamp | undefined): number {
  return timestamp === undefined ? Number.NaN : timestamp.seconds * 1000 + timestamp.nanos / 1e6;
}

/** Where one execution's time went, in ms, from the client's clock and the worker's ExecutedActionMetadata. */
export interface Phases {
  /** Execute sent → queued. */
  accept: number;
  /** Queued → the worker starts. */
  dispatch: number;
  /** Worker start → input fetch start: the assignment checked. */
  check: number;
  /** The input fetch phase: the input root laid out; for an image, the image pulled and unpacked if missing, pinned, its overlay directories made alongside. */
  fetch: number;
  /** Input fetch done → the sandbox reports its start: stdout and stderr opened, mount points made. */
  launch: number;
  /** The sandbox as the worker timed it. */
  sandbox: number;
  /** Sandbox end → worker done: outputs, stdout and stderr. */
  outputs: number;
  /** Worker done → COMPLETED at the client: completion message, action cache write, reply. */
  reply: number;
}

const PHASE_NAMES: Record<keyof Phases, string> = {
  accept: "Execute sent → queued",
  dispatch: "queued → worker starts",
  check: "worker starts → input fetch starts",
  fetch: "input fetch (image if any, overlay directories, input root)",
  launch: "input fetch done → sandbox starts",
  sandbox: "sandbox",
  outputs: "sandbox ends → worker done",
  reply: "worker done → COMPLETED at the client",
};

export function phasesOf(sent: number, received: number, m: ExecutedActionMetadata | undefined): Phases {
  return {
    accept: ms(m?.queuedTimestamp) - sent,
    dispatch: ms(m?.workerStartTimestamp) - ms(m?.queuedTimestamp),
    check: ms(m?.inputFetchStartTimestamp) - ms(m?.workerStartTimestamp),
    fetch: ms(m?.inputFetchCompletedTimestamp) - ms(m?.inputFetchStartTimestamp),
    launch: ms(m?.executionStartTimestamp) - ms(m?.inputFetchCompletedTimestamp),
    sandbox: ms(m?.executionCompletedTimestamp) - ms(m?.executionStartTimestamp),
    outputs: ms(m?.workerCompletedTimestamp) - ms(m?.executionCompletedTimestamp),
    reply: received - ms(m?.workerCompletedTimestamp),
  };
}

export function describePhases(all: Phases[], digits: number, scale = 1): string {
  return (Object.keys(PHASE_NAMES) as (keyof Phases)[])
    .map((key) => `${PHASE_NAMES[key]} ${fmt(median(all.map((p) => p[key])) / scale, digits)}`)
    .join("; ");
}
