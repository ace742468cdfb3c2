import { spawn } from "node:child_process";
import { type FileHandle, open, readFile, readlink, stat } from "node:fs/promises";
import { constants } from "node:os";
import { dirname, isAbsolute, relative, resolve, sep } from "node:path";
import type { Readable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { sandboxArgs } from "./bwrap-args.js";
import { imageBwrapArgs, imageLaunchArgs, prepareImageMountPoints } from "./image-root.js";
import type { Sandbox, SandboxRequest, SandboxResult } from "./sandbox.js";

export interface BubblewrapSandboxOptions {
  /** Default "bwrap", looked up in the worker's PATH. */
  bwrapPath?: string;
  /** The unprivileged host user and group the action runs as; default 65534/65534 (nobody/nogroup). */
  uid?: number;
  gid?: number;
}

const NOBODY = 65534;
const EXEC_FAILED = 127;
const STATUS_FD = 3;
/** Where the action sees its input root. */
export const INPUT_ROOT_MOUNT = "/run/berth/execroot";
/** Longest delay setTimeout accepts. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** A process stuck in uninterruptible sleep can outlive SIGKILL; don't block the worker forever on it. */
const REAP_LIMIT_MS = 10_000;

type KillReason = "timeout" | "cancel";

/**
 * Runs the command with bubblewrap, started as an unprivileged host user: bubblewrap then creates the user
 * namespace itself, so the action holds no privilege over root's files (as it would in a user namespace created
 * by root). See `SandboxRequest` for what the caller must prepare.
 */
export class BubblewrapSandbox implements Sandbox {
  readonly #bwrapPath: string;
  readonly #uid: number;
  readonly #gid: number;
  readonly #reachableParents = new Map<string, boolean>();

  constructor(options: BubblewrapSandboxOptions = {}) {
    this.#bwrapPath = options.bwrapPath ?? "bwrap";
    this.#uid = options.uid ?? NOBODY;
    this.#gid = options.gid ?? NOBODY;
  }

  async run(request: SandboxRequest): Promise<SandboxResult> {
    const { root, workDir } = await checkRequest(request);
    const handles: FileHandle[] = [];
    try {
      const stdout = await open(request.stdoutPath, "w");
      handles.push(stdout);
      // Two descriptors on one file would overwrite each other's output.
      const stderr = request.stderrPath === request.stdoutPath ? stdout : await open(request.stderrPath, "w");
      handles.push(stderr);
      if (request.image) {
        await prepareImageMountPoints(request.image);
        const sandbox = imageBwrapArgs(request, request.image, relative(root, workDir), STATUS_FD);
        const launch = imageLaunchArgs(request.image, root, this.#uid, this.#gid);
        return await this.#execute(
          request,
          { file: "unshare", args: [...launch, this.#bwrapPath, ...sandbox], asUser: false },
          stdout,
          stderr,
        );
      }
      const direct = await this.#reachable(root);
      // The action's user must reach the input root to bind it. When a directory above it is closed to that
      // user (a data directory under /root, say), root binds it first in a private mount namespace, at a
      // path the user can reach, and only then becomes that user. Neither mount is visible on the host.
      const source = direct ? root : INPUT_ROOT_MOUNT;
      const sandbox = bwrapArgs(request, source, root, workDir);
      const command = direct
        ? { file: this.#bwrapPath, args: sandbox, asUser: true }
        : { file: "unshare", args: [...this.#privateMountPrefix(root), this.#bwrapPath, ...sandbox], asUser: false };
      return await this.#execute(request, command, stdout, stderr);
    } finally {
      await Promise.all([...new Set(handles)].map((handle) => handle.close()));
    }
  }

  /** Whether the action's user can reach `root` through the directories above it. */
  async #reachable(root: string): Promise<boolean> {
    const parent = dirname(root);
    if (!(await this.#searchable(parent))) return false;
    // Each action's own directory is new, so only the directories above it are remembered.
    const above = dirname(parent);
    let known = this.#reachableParents.get(above);
    if (known === undefined) {
      known = true;
      for (let dir = above; ; dir = dirname(dir)) {
        if (!(await this.#searchable(dir))) known = false;
        if (dir === dirname(dir)) break;
      }
      this.#reachableParents.set(above, known);
    }
    return known;
  }

  async #searchable(dir: string): Promise<boolean> {
    const info = await stat(dir);
    return (
      (info.uid === this.#uid && (info.mode & 0o100) !== 0) ||
      (info.gid === this.#gid && (info.mode & 0o010) !== 0) ||
      (info.mode & 0o001) !== 0
    );
  }

  /** `unshare … sh -c …`: a private mount namespace with `root` bound at INPUT_ROOT_MOUNT, then the user switch. */
  #privateMountPrefix(root: string): string[] {
    const script =
      'mount -t tmpfs -o mode=0755 berth /run && mkdir -p "$2" && mount --bind "$1" "$2" && shift 2 && ' +
      `exec setpriv --reuid=${this.#uid} --regid=${this.#gid} --clear-groups -- "$@"`;
    return ["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", root, INPUT_ROOT_MOUNT];
  }

  async #execute(
    request: SandboxRequest,
    command: { file: string; args: string[]; asUser: boolean },
    stdout: FileHandle,
    stderr: FileHandle,
  ): Promise<SandboxResult> {
    const startedAt = new Date();
    // detached: bwrap leads its own process group (and session, so the action has no controlling terminal),
    // which lets one kill(-pgid) reach every sandbox process that has not called setsid itself.
    const child = spawn(command.file, command.args, {
      stdio: ["ignore", stdout.fd, stderr.fd, "pipe"],
      ...(command.asUser ? { uid: this.#uid, gid: this.#gid } : {}),
      detached: true,
      cwd: "/",
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    });

    let status = "";
    const statusStream = child.stdio[STATUS_FD] as Readable | null;
    statusStream?.setEncoding("utf8");
    statusStream?.on("data", (chunk: string) => {
      status += chunk;
    });

    let killedFor: KillReason | undefined;
    const kill = (reason: KillReason) => {
      if (killedFor !== undefined || child.pid === undefined) return;
      killedFor = reason;
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // Already gone.
      }
    };
    const timeoutMs = request.timeoutMs > 0 ? Math.min(request.timeoutMs, MAX_TIMER_MS) : undefined;
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => kill("timeout"), timeoutMs);
    const onAbort = () => kill("cancel");
    request.signal?.addEventListener("abort", onAbort, { once: true });
    if (request.signal?.aborted) onAbort();

    try {
      const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done, fail) => {
        child.once("error", fail);
        child.once("close", (code, signal) => done({ code, signal }));
      }).catch((error: Error) => {
        throw new Error(`cannot start bubblewrap (${this.#bwrapPath}): ${error.message}`, { cause: error });
      });
      const report = parseStatus(status);
      if (report.childPid !== undefined && report.pidNamespace !== undefined) {
        await waitForSandboxEnd(report.childPid, report.pidNamespace);
      }
      const completedAt = new Date();

      // A command killed by a signal already shows up as 128 + n in bwrap's own exit code.
      let exitCode = exit.code ?? 128 + constants.signals[exit.signal ?? "SIGKILL"];
      if (report.exitCode === undefined && killedFor === undefined) {
        // bwrap reports an exit code only for a command it managed to exec.
        const message = await readStart(request.stderrPath);
        if (!message.includes("bwrap: execvp ")) {
          throw new Error(`bubblewrap could not set up the sandbox: ${message.trim() || `exit code ${exitCode}`}`);
        }
        exitCode = EXEC_FAILED;
      }
      return { exitCode, timedOut: killedFor === "timeout", cancelled: killedFor === "cancel", startedAt, completedAt };
    } finally {
      clearTimeout(timer);
      request.signal?.removeEventListener("abort", onAbort);
    }
  }
}

async function checkRequest(request: SandboxRequest): Promise<{ root: string; workDir: string }> {
  if (!isAbsolute(request.inputRoot)) throw new Error(`input root ${request.inputRoot} is not an absolute path`);
  const root = resolve(request.inputRoot);
  const workDir = resolve(root, request.workingDirectory);
  const inside = relative(root, workDir);
  if (isAbsolute(request.workingDirectory) || inside.split(sep)[0] === "..") {
    throw new Error(`working directory ${request.workingDirectory} is not inside the input root`);
  }
  if (request.argv.length === 0) throw new Error("argv is empty");
  const strings = [...request.argv, ...request.env.flatMap(({ name, value }) => [name, value])];
  if (strings.some((s) => s.includes("\0"))) throw new Error("argv and env must not contain NUL characters");
  const badName = request.env.find(({ name }) => name === "" || name.includes("="));
  if (badName) throw new Error(`invalid environment variable name ${JSON.stringify(badName.name)}`);
  const isDirectory = await stat(workDir).then(
    (s) => s.isDirectory(),
    () => false,
  );
  if (!isDirectory) throw new Error(`working directory ${request.workingDirectory} does not exist in the input root`);
  return { root, workDir };
}

/** bwrap's command line for `request`, with `source` (the host path of `root`) bound at INPUT_ROOT_MOUNT. */
export function bwrapArgs(request: SandboxRequest, source: string, root: string, workDir: string): string[] {
  return sandboxArgs(request, {
    root: ["--ro-bind", "/", "/"],
    // The host's /run (sockets of system services, among them Docker's) is hidden; the input root is
    // bound there, at the same path whichever way it was reached.
    hide: ["/run"],
    inputSource: source,
    inputMount: INPUT_ROOT_MOUNT,
    workDirInRoot: relative(root, workDir),
    runAsRoot: false,
    statusFd: STATUS_FD,
  });
}

interface StatusReport {
  childPid?: number;
  pidNamespace?: number;
  exitCode?: number;
}

/** bwrap's --json-status-fd output: one JSON object per line. */
function parseStatus(text: string): StatusReport {
  const report: StatusReport = {};
  for (const line of text.split("\n")) {
    let fields: Record<string, unknown>;
    try {
      fields = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue; // Blank, or cut short by a kill.
    }
    if (typeof fields["child-pid"] === "number") report.childPid = fields["child-pid"];
    if (typeof fields["pid-namespace"] === "number") report.pidNamespace = fields["pid-namespace"];
    if (typeof fields["exit-code"] === "number") report.exitCode = fields["exit-code"];
  }
  return report;
}

/**
 * bwrap exits as soon as the command does, leaving the sandbox's pid 1 to die through --die-with-parent. The
 * kernel lets that pid 1 finish dying (become a zombie) only after every other process of its PID namespace is
 * gone, so waiting for it guarantees that nothing of the action still runs, e.g. writes to the input root.
 */
async function waitForSandboxEnd(pid: number, pidNamespace: number): Promise<void> {
  const deadline = Date.now() + REAP_LIMIT_MS;
  while (Date.now() < deadline && !(await sandboxEnded(pid, pidNamespace))) await sleep(5);
}

async function sandboxEnded(pid: number, pidNamespace: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2)[0];
    if (state === "Z" || state === "X") return true;
    // The pid may have been reused by an unrelated process.
    return (await readlink(`/proc/${pid}/ns/pid`)) !== `pid:[${pidNamespace}]`;
  } catch {
    return true;
  }
}

async function readStart(path: string): Promise<string> {
  const handle = await open(path, "r");
  try {
    const buffer = Buffer.alloc(4096);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, 0);
    return buffer.toString("utf8", 0, bytesRead);
  } finally {
    await handle.close();
  }
}
