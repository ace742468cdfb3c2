/**
 * Runs the execution benchmarks' references in a small Node.js process of its own, as a freshly started worker
 * would run its sandboxes. Spawning forks the calling process, and after the CAS benchmarks the benchmark's own
 * process holds hundreds of MiB, which made every fork there several times slower than in a fresh process.
 *
 * Started with child_process.fork by bench/execution.ts; it answers each request on the IPC channel and times
 * the work itself, so the channel's own latency is not counted.
 */

import { spawn } from "node:child_process";
import { type FileHandle, open } from "node:fs/promises";
import type { Readable } from "node:stream";
import { BubblewrapSandbox, bwrapArgs } from "../src/sandbox/bubblewrap.js";
import { DEFAULT_LIMITS } from "../src/sandbox/limits.js";
import type { SandboxRequest } from "../src/sandbox/sandbox.js";

export const NOBODY = 65534;
export const PATH = { name: "PATH", value: "/usr/bin:/bin" };

/** A prepared input root and where its command's output goes. */
export interface SandboxSlot {
  root: string;
  stdoutPath: string;
  stderrPath: string;
}

export type HelperRequest =
  | { id: number; op: "sandbox" | "raw"; slot: SandboxSlot; argv: string[] }
  /** Runs `sh -c 'echo I'` for I in [0, count), `slots.length` at a time, each in a free slot. */
  | { id: number; op: "batch"; slots: SandboxSlot[]; count: number };

export interface HelperReply {
  id: number;
  /** How long the work took, ms, timed in the helper. */
  ms: number;
  /** "batch": how long each run took, ms. */
  runs?: number[];
  error?: string;
}

/** bwrap's command line exactly as the sandbox builds it, for a command run in the input root without network. */
function rawArgs(root: string, argv: string[]): string[] {
  const request: SandboxRequest = {
    inputRoot: root,
    workingDirectory: "",
    argv,
    env: [PATH],
    timeoutMs: 0,
    stdoutPath: "/dev/null",
    stderrPath: "/dev/null",
  };
  const { tmpSizeBytes, shmSizeBytes } = DEFAULT_LIMITS;
  return bwrapArgs(request, root, root, root, { tmpSizeBytes, shmSizeBytes, command: argv });
}

export function sandboxRequest(slot: SandboxSlot, argv: string[]): SandboxRequest {
  return {
    inputRoot: slot.root,
    workingDirectory: "",
    argv,
    env: [PATH],
    timeoutMs: 60_000,
    stdoutPath: slot.stdoutPath,
    stderrPath: slot.stderrPath,
  };
}

/**
 * The raw floor: bwrap spawned as uid 65534 with the same command line and stdio as the sandbox uses, awaited
 * until it closes; none of BubblewrapSandbox's checks, file opening or waiting for the sandbox's pid 1 to die.
 * `out` is a file descriptor open for writing, used for stdout and stderr.
 */
async function rawBwrap(root: string, argv: string[], out: number): Promise<number> {
  const child = spawn("bwrap", rawArgs(root, argv), {
    stdio: ["ignore", out, out, "pipe"],
    uid: NOBODY,
    gid: NOBODY,
    detached: true,
    cwd: "/",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
  });
  (child.stdio[3] as Readable | null)?.resume();
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code) => resolve(code ?? -1));
  });
}

function elapsedMs(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

const sandbox = new BubblewrapSandbox();
/** Where raw bwrap's output goes, by slot; kept open (a FileHandle left to the garbage collector warns). */
const rawOutputs = new Map<string, FileHandle>();

async function handle(request: HelperRequest): Promise<HelperReply> {
  const start = process.hrtime.bigint();
  if (request.op === "sandbox") {
    const result = await sandbox.run(sandboxRequest(request.slot, request.argv));
    if (result.exitCode !== 0) throw new Error(`${request.argv.join(" ")} exited with ${result.exitCode}`);
    return { id: request.id, ms: elapsedMs(start) };
  }
  if (request.op === "raw") {
    let out = rawOutputs.get(request.slot.stdoutPath);
    if (out === undefined) {
      out = await open(`${request.slot.stdoutPath}.raw`, "w");
      rawOutputs.set(request.slot.stdoutPath, out);
    }
    const begin = process.hrtime.bigint();
    const code = await rawBwrap(request.slot.root, request.argv, out.fd);
    if (code !== 0) throw new Error(`bwrap ${request.argv.join(" ")} exited with ${code}`);
    return { id: request.id, ms: elapsedMs(begin) };
  }
  if (request.op !== "batch") throw new Error(`unknown request ${JSON.stringify(request)}`);
  const { slots, count } = request;
  const free = [...slots];
  const runs: number[] = [];
  let next = 0;
  const lane = async () => {
    while (next < count) {
      const i = next++;
      const slot = free.pop() as SandboxSlot;
      try {
        const begin = process.hrtime.bigint();
        const result = await sandbox.run(sandboxRequest(slot, ["sh", "-c", `echo ${i}`]));
        if (result.exitCode !== 0) throw new Error(`sh -c 'echo ${i}' exited with ${result.exitCode}`);
        runs.push(elapsedMs(begin));
      } finally {
        free.push(slot);
      }
    }
  };
  await Promise.all(slots.map(lane));
  return { id: request.id, ms: elapsedMs(start), runs };
}

if (process.send !== undefined) {
  process.on("message", (request: HelperRequest) => {
    handle(request)
      .catch((err: unknown): HelperReply => ({ id: request.id, ms: Number.NaN, error: String(err) }))
      .then((reply) => process.send?.(reply));
  });
}
