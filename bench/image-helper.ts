/**
 * Runs the image benchmark's references in a small Node.js process of its own, as bench/sandbox-helper.ts does
 * for the execution benchmarks: spawning forks the calling process, and a fresh small process forks as fast as a
 * fresh worker does, whatever the benchmark's own process holds by then.
 *
 * Started with child_process.fork by bench/images.ts; it answers each request on the IPC channel and times the
 * work itself, so the channel's own latency is not counted.
 */
import { spawn } from "node:child_process";
import { chown, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { overlayMountArgs } from "../src/image/overlay.js";
import { BubblewrapSandbox, INPUT_ROOT_MOUNT } from "../src/sandbox/bubblewrap.js";

export const NOBODY = 65534;

export type ImageHelperRequest =
  /**
   * BubblewrapSandbox.run of `argv` with an image root: an overlay of `lower` with an upper and a work directory
   * made for this run in `dir` (which must not exist), and an empty input root there, as a worker lays them out.
   */
  | { id: number; op: "overlay"; lower: string; dir: string; argv: string[]; env: { name: string; value: string }[] }
  /** bwrap spawned as uid 65534 with `root` bound read-only as `/` (see rawBwrapArgs). */
  | { id: number; op: "raw"; root: string; argv: string[]; env: { name: string; value: string }[] }
  /** `docker ARGS…` with `env` added to the environment, awaited until it exits. */
  | { id: number; op: "docker"; docker: string; args: string[]; env: Record<string, string> };

export interface ImageHelperReply {
  id: number;
  /** How long the work took, ms, timed in the helper. */
  ms: number;
  error?: string;
}

/** bwrap's command line for a command run directly on an unpacked root, with the sandbox's isolation. */
export function rawBwrapArgs(root: string, argv: string[], env: { name: string; value: string }[]): string[] {
  const args = [
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--unshare-net",
    "--die-with-parent",
    "--ro-bind",
    root,
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--perms",
    "1777",
    "--tmpfs",
    "/tmp",
    "--chdir",
    "/",
    "--clearenv",
  ];
  for (const { name, value } of env) args.push("--setenv", name, value);
  args.push("--", ...argv);
  return args;
}

function elapsedMs(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

/** Spawns a command and resolves with its exit code once it has exited and its output is closed. */
function runCommand(file: string, args: string[], options: { uid?: number; gid?: number; env: NodeJS.ProcessEnv }) {
  const child = spawn(file, args, {
    stdio: ["ignore", "ignore", "pipe"],
    ...(options.uid === undefined ? {} : { uid: options.uid, gid: options.gid }),
    cwd: "/",
    env: options.env,
  });
  let stderr = "";
  (child.stderr as Readable).on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-2000);
  });
  return new Promise<{ code: number; stderr: string }>((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code) => resolve({ code: code ?? -1, stderr }));
  });
}

const sandbox = new BubblewrapSandbox();
const HOST_PATH = { PATH: process.env.PATH ?? "/usr/bin:/bin" };

async function handle(request: ImageHelperRequest): Promise<ImageHelperReply> {
  if (request.op === "overlay") {
    const { dir } = request;
    const start = process.hrtime.bigint();
    const upper = join(dir, "upper");
    const work = join(dir, "work");
    const root = join(dir, "root");
    await mkdir(dir);
    await Promise.all([mkdir(upper), mkdir(work), mkdir(root)]);
    await chown(root, NOBODY, NOBODY);
    const overlay = overlayMountArgs([request.lower], upper, work, join(dir, "layers"));
    const result = await sandbox.run({
      inputRoot: root,
      workingDirectory: "",
      argv: request.argv,
      env: request.env,
      timeoutMs: 60_000,
      stdoutPath: join(dir, "stdout"),
      stderrPath: join(dir, "stderr"),
      root: {
        kind: "overlay",
        overlayOptions: overlay.options,
        overlayCwd: overlay.cwd,
        upperDir: upper,
        inputRootPath: INPUT_ROOT_MOUNT,
      },
    });
    const took = elapsedMs(start);
    if (result.exitCode !== 0) throw new Error(`${request.argv.join(" ")} exited with ${result.exitCode}`);
    // Untimed, as a worker removes an action's directory after it has sent the completion.
    await rm(dir, { recursive: true, force: true });
    return { id: request.id, ms: took };
  }
  if (request.op === "raw") {
    const start = process.hrtime.bigint();
    const { code, stderr } = await runCommand("bwrap", rawBwrapArgs(request.root, request.argv, request.env), {
      uid: NOBODY,
      gid: NOBODY,
      env: HOST_PATH,
    });
    const took = elapsedMs(start);
    if (code !== 0) throw new Error(`bwrap ${request.argv.join(" ")} exited with ${code}: ${stderr}`);
    return { id: request.id, ms: took };
  }
  if (request.op !== "docker") throw new Error(`unknown request ${JSON.stringify(request)}`);
  const start = process.hrtime.bigint();
  const { code, stderr } = await runCommand(request.docker, request.args, { env: { ...HOST_PATH, ...request.env } });
  const took = elapsedMs(start);
  if (code !== 0) throw new Error(`docker ${request.args.join(" ")} exited with ${code}: ${stderr}`);
  return { id: request.id, ms: took };
}

if (process.send !== undefined) {
  process.on("message", (request: ImageHelperRequest) => {
    handle(request)
      .catch((err: unknown): ImageHelperReply => ({ id: request.id, ms: Number.NaN, error: String(err) }))
      .then((reply) => process.send?.(reply));
  });
}
