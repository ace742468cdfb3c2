import { execFileSync } from "node:child_process";
import {
  chownSync,
  copyFileSync,
  constants as fsConstants,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { Socket } from "node:net";
import { isAbsolute, join, relative, resolve, sep } from "node:path";
import type { Readable, Writable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { LAUNCH_FAILED, type Launched, type Launcher, type LaunchStep, sharedLauncher } from "../process/launcher.js";
import { type ActionRoot, HOST_ROOT } from "./action-root.js";
import { parseStatus, reachedLimit, waitForSandboxEnd } from "./bubblewrap.js";
import { DEFAULT_USER } from "./bwrap-args.js";
import type { SlotCgroup } from "./cgroups.js";
import { DiskMonitor } from "./disk-monitor.js";
import { DEFAULT_LIMITS, describeLimit, limitSteps, type SandboxLimits } from "./limits.js";
import { uidProcesses } from "./open-deleted-files.js";
import { IO_MOUNT, maskableFiles, type ResidentLayout, residentLayout } from "./resident-layout.js";
import type { SandboxResult, SandboxUser } from "./sandbox.js";

export interface ResidentSandboxOptions {
  /**
   * Host directory bound as the action's input root; it may be empty when the sandbox starts ("made ahead"):
   * what is laid out in it later shows inside. Prepared as for `SandboxRequest.inputRoot`. The directory
   * itself must stay (a new one would not be bound); for a chroot input root, so must its proc, dev and tmp,
   * on which the sandbox mounts.
   */
  inputRoot: string;
  /** A directory the sandbox creates for its own files (pipes to its agent, output files); close() removes it. */
  stateDir: string;
  /** What commands see as "/"; the host's root, read-only, when absent. */
  root?: ActionRoot;
  /** The ids commands have inside the sandbox; nobody when absent. */
  user?: SandboxUser;
  /** Network access for every command (default false: a loopback of the sandbox's own). */
  network?: boolean;
  /** As in BubblewrapSandboxOptions. */
  bwrapPath?: string;
  uid?: number;
  gid?: number;
  limits?: SandboxLimits;
  cgroup?: SlotCgroup;
  slirp4netnsPath?: string;
  maskedFiles?: readonly string[];
  /** What starts bwrap; the process's shared launcher when absent (the sandbox then joins `cgroup` itself). */
  launcher?: Launcher;
}

/** One command for a resident sandbox: `SandboxRequest` without what was fixed when the sandbox started. */
export interface ResidentRunRequest {
  /** Relative to the input root; "" is the input root itself. */
  workingDirectory: string;
  /** argv[0] is resolved via PATH from `env` when it has no slash (REAPI 2.3), else relative to the working directory. */
  argv: string[];
  /** Exactly the command's environment (plus PWD, the working directory's path, as bwrap sets it). */
  env: { name: string; value: string }[];
  /** Wall-clock limit; 0 or Infinity means none. */
  timeoutMs: number;
  /** Host files that receive the command's stdout and stderr (moved there when it ends). */
  stdoutPath: string;
  stderrPath: string;
  /** Aborting it kills the command, and with it the sandbox. */
  signal?: AbortSignal;
}

/** A long-lived process inside a sandbox, with pipes to the worker (a persistent worker, say). */
export interface PipedProcess {
  stdin: Writable;
  stdout: Readable;
  stderr: Readable;
  /** Its exit code (128 + the signal number when a signal ended it; 137 when the sandbox ended first). */
  exited: Promise<number>;
  /** Kills it and the processes of its process group. */
  kill(): void;
}

/** Starts long-lived processes with pipes to the worker; what a persistent worker's protocol is written against. */
export interface WorkerProcessLauncher {
  spawnPiped(argv: string[], env: { name: string; value: string }[], workingDirectory: string): Promise<PipedProcess>;
}

const NOBODY = 65534;
const KILLED = 128 + 9;
/** Longest delay setTimeout accepts. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** bwrap and the agent take milliseconds to start; far longer means something is wrong. */
const START_LIMIT_MS = 30_000;
const PRCTL: Partial<Record<NodeJS.Architecture, number>> = { x64: 157, arm64: 167 };

let agentScript: string | undefined;
/** The agent's source, passed with perl -e: nothing inside the sandbox needs to reach a file of Berth's. */
function agent(): string {
  if (agentScript === undefined) {
    const beside = fileURLToPath(new URL("./agent.pl", import.meta.url));
    // The build copies launcher.pl beside its module; the agent is read from the sources when not copied too.
    const source = fileURLToPath(new URL("../../../src/sandbox/agent.pl", import.meta.url));
    agentScript = readFileSync(statOrUndefined(beside) ? beside : source, "utf8");
  }
  return agentScript;
}

/**
 * Starts a bubblewrap sandbox that stays: its first process, the agent (agent.pl), runs commands in it on
 * request. The sandbox has the isolation of a one-shot BubblewrapSandbox for the same root and slot (the
 * same namespaces, mounts, user, cgroup and limits), and its input root is bound from the start, so an
 * action needs no sandbox of its own when it arrives, only its inputs laid out in `options.inputRoot`.
 */
export async function startResidentSandbox(options: ResidentSandboxOptions): Promise<ResidentSandbox> {
  const sandbox = new ResidentSandbox(options);
  try {
    await sandbox.start();
  } catch (error) {
    await sandbox.close();
    throw error;
  }
  return sandbox;
}

type Ending = "timeout" | "cancel" | "disk";

interface Pending {
  started: () => void;
  failed: (reason: string) => void;
  exited: (code: number) => void;
}

/**
 * A started resident sandbox. Commands run one after another or side by side; processes a command leaves
 * running stay until `close()` (a warm runner's state). Its commands share its uid, its /tmp and its
 * namespaces: everything a command does is visible to the next, which is why a sandbox is reused only for the
 * same key. A command cannot reach the agent to run anything as anyone else (see agent.pl); at worst it breaks
 * its own sandbox, and `run` then rejects.
 *
 * A run that timed out or was cancelled ends the whole sandbox (the only sure way to end every process the
 * command started, whatever it did to its process group): such a sandbox cannot be used again, and the
 * caller closes it. So does one whose agent is gone.
 */
export class ResidentSandbox implements WorkerProcessLauncher {
  readonly #options: ResidentSandboxOptions;
  readonly #uid: number;
  readonly #gid: number;
  readonly #limits: SandboxLimits;
  readonly #ioDir: string;
  readonly #controlDir: string;
  readonly #pending = new Map<string, Pending>();
  #layout: ResidentLayout | undefined;
  #launched: Launched | undefined;
  #requests: Socket | undefined;
  #replies: Socket | undefined;
  #agentPid: number | undefined;
  #pidNamespace: number | undefined;
  #nextId = 0;
  /** Why the sandbox cannot run anything any more. */
  #gone: Error | undefined;
  #closed = false;
  #madeStateDir = false;
  #ended: Promise<void> | undefined;
  #onReady: ((error?: Error) => void) | undefined;

  constructor(options: ResidentSandboxOptions) {
    this.#options = options;
    this.#uid = options.uid ?? NOBODY;
    this.#gid = options.gid ?? NOBODY;
    this.#limits = options.limits ?? DEFAULT_LIMITS;
    this.#controlDir = join(options.stateDir, "control");
    this.#ioDir = join(options.stateDir, "io");
  }

  /** The agent's host pid (the sandbox's pid 1): killing it ends the sandbox and everything in it. */
  get agentPid(): number | undefined {
    return this.#agentPid;
  }

  /** Whether the sandbox can still run commands. */
  get usable(): boolean {
    return this.#gone === undefined && !this.#closed;
  }

  get limits(): SandboxLimits {
    return this.#limits;
  }

  /** Only through startResidentSandbox. */
  async start(): Promise<void> {
    const options = this.#options;
    if (!isAbsolute(options.inputRoot)) throw new Error(`input root ${options.inputRoot} is not an absolute path`);
    const prctl = PRCTL[process.arch];
    if (prctl === undefined) throw new Error(`the sandbox agent does not know prctl's number on ${process.arch}`);
    // The control directory is root's alone and never bound into the sandbox; the io directory is the
    // action's user's, bound at IO_MOUNT for the agent to create output files in.
    mkdirSync(options.stateDir, { mode: 0o700 });
    this.#madeStateDir = true;
    mkdirSync(this.#controlDir, { mode: 0o700 });
    mkdirSync(this.#ioDir, { mode: 0o700 });
    chownSync(this.#ioDir, this.#uid, this.#gid);
    const requestPath = join(this.#controlDir, "requests");
    const replyPath = join(this.#controlDir, "replies");
    mkfifo(requestPath, replyPath);
    // Both ends open before the launcher opens its own: O_RDWR and O_NONBLOCK never wait for the other side.
    const replyFd = openSync(replyPath, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    this.#replies = new Socket({ fd: replyFd, readable: true, writable: false });
    const requestFd = openSync(requestPath, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    this.#requests = new Socket({ fd: requestFd, readable: false, writable: true });
    this.#requests.on("error", (error) => this.#lose(`its agent's pipe failed (${error.message})`));
    this.#listen(this.#replies);

    const user = options.user ?? DEFAULT_USER;
    const root = options.root ?? HOST_ROOT;
    const masked = root.kind === "host" ? maskableFiles(options.maskedFiles ?? [], this.#uid, this.#gid) : [];
    const layout = await residentLayout({
      root,
      inputRoot: resolve(options.inputRoot),
      ioDir: this.#ioDir,
      uid: this.#uid,
      user,
      network: options.network ?? false,
      limits: this.#limits,
      masked,
    });
    this.#layout = layout;
    // As in BubblewrapSandbox: a sandbox with a network is started outside the cgroup, which it then joins.
    const launcher = options.network ? sharedLauncher() : (options.launcher ?? sharedLauncher());
    const launcherInCgroup = launcher.cgroupProcsFiles.length > 0;
    const steps: LaunchStep[] = [
      ...(options.network
        ? [{ kind: "netns", slirp4netnsPath: options.slirp4netnsPath ?? "slirp4netns" } as const]
        : []),
      ...layout.steps,
      ...limitSteps(this.#limits, options.cgroup, { launcherInCgroup }),
    ];
    const bwrap = options.bwrapPath ?? "bwrap";
    const ready = new Promise<void>((done, fail) => {
      this.#onReady = (error) => (error ? fail(error) : done());
    });
    const agentErr = join(this.#controlDir, "agent.err");
    const statusPath = join(this.#controlDir, "status");
    this.#launched = await launcher
      .launch({
        argv: [bwrap, ...layout.bwrapOptions, "--", "/usr/bin/perl", "-e", agent(), String(prctl), layout.commandRoot],
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
        user: { uid: this.#uid, gid: this.#gid },
        stdoutPath: replyPath,
        stderrPath: agentErr,
        fd3Path: statusPath,
        fd4Path: requestPath,
        steps,
      })
      .catch((error: Error) => {
        throw new Error(`cannot start bubblewrap (${bwrap}): ${error.message}`, { cause: error });
      });
    const launched = this.#launched;
    this.#ended = launched.exited.then(
      async (exit) => {
        this.#lose(`its sandbox ended (${exit.signal ? `signal ${exit.signal}` : `exit code ${exit.code}`})`);
        if (this.#agentPid !== undefined && this.#pidNamespace !== undefined) {
          await waitForSandboxEnd(this.#agentPid, this.#pidNamespace);
        }
      },
      (error: Error) => this.#lose(`its launcher failed (${error.message})`),
    );
    const timer = setTimeout(() => this.#onReady?.(new Error("the sandbox's agent did not start")), START_LIMIT_MS);
    try {
      await ready;
    } catch (error) {
      const said = readOrEmpty(agentErr).replaceAll(LAUNCH_FAILED, "").trim();
      throw new Error(`cannot start a resident sandbox: ${said || (error as Error).message}`, { cause: error });
    } finally {
      clearTimeout(timer);
      // Both ends are open now: the pipes keep no name anyone could open them by.
      rmSync(requestPath, { force: true });
      rmSync(replyPath, { force: true });
    }
    // bwrap reports its child (here the agent) before that child can print anything; a few looks suffice.
    for (let i = 0; i < 100 && this.#agentPid === undefined; i++) {
      const report = parseStatus(readOrEmpty(statusPath));
      this.#agentPid = report.childPid;
      this.#pidNamespace = report.pidNamespace;
      if (this.#agentPid === undefined) await sleep(1);
    }
    if (this.#agentPid === undefined) throw new Error("bubblewrap did not report the sandbox's first process");
  }

  /**
   * Runs one command and resolves once it has exited (its own process; what it left running stays). Rejects
   * when the sandbox cannot run it: closed, ended, its agent gone, or no process left to start it with.
   */
  async run(request: ResidentRunRequest): Promise<SandboxResult> {
    this.#checkUsable();
    const cwd = this.#workingDirectory(request.workingDirectory);
    checkCommand(request.argv, request.env);
    const id = String(this.#nextId++);
    const sameFile = request.stderrPath === request.stdoutPath;
    const out = `${id}.out`;
    const err = sameFile ? out : `${id}.err`;
    const before = this.#options.cgroup?.events();
    const startedAt = new Date();
    let ending: Ending | undefined;
    const end = (reason: Ending) => {
      if (ending !== undefined) return;
      ending = reason;
      this.#kill();
    };
    const timeoutMs = request.timeoutMs > 0 ? Math.min(request.timeoutMs, MAX_TIMER_MS) : undefined;
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => end("timeout"), timeoutMs);
    const onAbort = () => end("cancel");
    request.signal?.addEventListener("abort", onAbort, { once: true });
    // The disk bounds count what the sandbox holds, left by earlier commands too: it is one action's share.
    const layout = this.#layout as ResidentLayout;
    const disk = new DiskMonitor({
      areas: layout.writableAreas,
      bounds: { bytes: this.#limits.diskBytes, entries: this.#limits.diskEntries },
      processes: uidProcesses(this.#uid),
      onExceeded: () => end("disk"),
    });
    try {
      if (request.signal?.aborted) onAbort();
      const exitCode = await this.#command(id, "/dev/null", out, err, cwd, request.argv, request.env, undefined).exited;
      const completedAt = new Date();
      this.#deliver(out, request.stdoutPath);
      if (!sameFile) this.#deliver(err, request.stderrPath);
      const limit =
        (await disk.finish()) ??
        (exitCode === 0
          ? undefined
          : reachedLimit(exitCode, before, this.#options.cgroup?.events(), request.stderrPath));
      return {
        exitCode,
        timedOut: false,
        cancelled: false,
        startedAt,
        completedAt,
        ...(limit ? { limitReached: { limit, message: describeLimit(limit, this.#limits) } } : {}),
      };
    } catch (error) {
      if (ending === undefined) throw error;
      // Ended on purpose: the result is the command's, killed, once nothing of the sandbox runs.
      await this.#ended;
      this.#deliver(out, request.stdoutPath);
      if (!sameFile) this.#deliver(err, request.stderrPath);
      const limit = ending === "disk" ? await disk.finish() : undefined;
      return {
        exitCode: KILLED,
        timedOut: ending === "timeout",
        cancelled: ending === "cancel",
        startedAt,
        completedAt: new Date(),
        ...(limit ? { limitReached: { limit, message: describeLimit(limit, this.#limits) } } : {}),
      };
    } finally {
      disk.stop();
      clearTimeout(timer);
      request.signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Starts a long-lived process in the sandbox whose stdin, stdout and stderr are pipes to the worker. The
   * pipes are FIFOs in the io directory, unlinked once the process has them open.
   */
  async spawnPiped(
    argv: string[],
    env: { name: string; value: string }[],
    workingDirectory: string,
  ): Promise<PipedProcess> {
    this.#checkUsable();
    const cwd = this.#workingDirectory(workingDirectory);
    checkCommand(argv, env);
    const id = String(this.#nextId++);
    const names = ["in", "out", "err"].map((name) => `${id}.${name}`);
    const paths = names.map((name) => join(this.#ioDir, name));
    mkfifo(...paths);
    for (const path of paths) chownSync(path, this.#uid, this.#gid);
    const [inPath, outPath, errPath] = paths as [string, string, string];
    const [inName, outName, errName] = names as [string, string, string];
    const stdout = new Socket({
      fd: openSync(outPath, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK),
      writable: false,
    });
    const stderr = new Socket({
      fd: openSync(errPath, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK),
      writable: false,
    });
    const stdin = new Socket({ fd: openSync(inPath, fsConstants.O_RDWR | fsConstants.O_NONBLOCK), readable: false });
    let started = false;
    let onStart: () => void = () => {};
    const running = new Promise<void>((done) => {
      onStart = done;
    });
    const command = this.#command(id, inName, outName, errName, cwd, argv, env, () => {
      started = true;
      onStart();
    });
    let failure: Error | undefined;
    const exited = command.exited.catch((error: Error) => {
      failure = error;
      return KILLED;
    });
    try {
      await Promise.race([running, exited]);
    } finally {
      for (const path of paths) rmSync(path, { force: true });
    }
    const closeAll = () => {
      for (const socket of [stdin, stdout, stderr]) socket.destroy();
    };
    if (!started && failure) {
      closeAll();
      throw failure;
    }
    return {
      stdin,
      stdout,
      stderr,
      exited: exited.then((code) => {
        stdin.destroy();
        return code;
      }),
      kill: () => {
        if (this.usable) this.#send(["kill", id]);
        else closeAll();
      },
    };
  }

  /** Kills every process of the sandbox, waits until none is left, and removes its files. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#kill();
    await this.#ended;
    this.#lose("it was closed");
    this.#requests?.destroy();
    this.#replies?.destroy();
    if (this.#madeStateDir) rmSync(this.#options.stateDir, { recursive: true, force: true });
  }

  #checkUsable(): void {
    if (this.#closed) throw new Error("this resident sandbox is closed");
    if (this.#gone) throw new Error(`this resident sandbox cannot run commands: ${this.#gone.message}`);
  }

  /** The working directory as commands see it; on a root whose layout the worker knows, also that it exists. */
  #workingDirectory(workingDirectory: string): string {
    const layout = this.#layout as ResidentLayout;
    const inside = relative("/root", resolve("/root", workingDirectory));
    if (isAbsolute(workingDirectory) || inside.split(sep)[0] === "..") {
      throw new Error(`working directory ${workingDirectory} is not inside the input root`);
    }
    // In a chroot input root the kernel resolves it inside the root (its symlinks are the client's, and may
    // be absolute); elsewhere the worker checked it inside the input root.
    if (this.#options.root?.kind !== "input-root") {
      const host = join(resolve(this.#options.inputRoot), inside);
      if (!statOrUndefined(host)?.isDirectory()) {
        throw new Error(`working directory ${workingDirectory} does not exist in the input root`);
      }
    }
    return join(layout.inputMount, inside);
  }

  /** Asks the agent to run a command; `started`, if given, is called once it has forked it with its files open. */
  #command(
    id: string,
    stdin: string,
    stdout: string,
    stderr: string,
    cwd: string,
    argv: string[],
    env: { name: string; value: string }[],
    started: (() => void) | undefined,
  ): { exited: Promise<number> } {
    const io = (name: string) => (name === "/dev/null" ? name : join(IO_MOUNT, name));
    const exited = new Promise<number>((done, fail) => {
      this.#pending.set(id, {
        started: started ?? (() => {}),
        failed: (reason) => fail(new Error(`the sandbox could not start the command: ${reason}`)),
        exited: done,
      });
    });
    const variables = env.map(({ name, value }) => `${name}=${value}`);
    this.#send([
      started ? "spawn" : "run",
      id,
      io(stdin),
      io(stdout),
      io(stderr),
      cwd,
      String(argv.length),
      ...argv,
      String(variables.length),
      ...variables,
    ]);
    return { exited };
  }

  #send(fields: string[]): void {
    this.#requests?.write(`${fields.length}\0${fields.join("\0")}\0`);
  }

  #listen(replies: Socket): void {
    let buffered = "";
    replies.setEncoding("utf8");
    replies.on("data", (chunk: string) => {
      buffered += chunk;
      for (let end = buffered.indexOf("\n"); end >= 0; end = buffered.indexOf("\n")) {
        this.#receive(buffered.slice(0, end));
        buffered = buffered.slice(end + 1);
      }
    });
    replies.on("error", (error) => this.#lose(`its agent's pipe failed (${error.message})`));
    replies.on("end", () => this.#lose("its agent is gone"));
  }

  #receive(line: string): void {
    const [kind = "", id = "", ...rest] = line.split(" ");
    if (kind === "ready") {
      this.#onReady?.();
      return;
    }
    const pending = this.#pending.get(id);
    if (!pending) return;
    if (kind === "started") {
      pending.started();
      return;
    }
    this.#pending.delete(id);
    if (kind === "exited") pending.exited(Number(rest[0]));
    else pending.failed(rest.join(" "));
  }

  /** The sandbox can run nothing more: every command still waited for fails with `reason`. */
  #lose(reason: string): void {
    this.#gone ??= new Error(`the resident sandbox ended: ${reason}`);
    this.#onReady?.(this.#gone);
    for (const pending of this.#pending.values()) pending.failed(this.#gone.message);
    this.#pending.clear();
  }

  /** SIGKILL to the sandbox's pid 1: the kernel then kills every process of its PID namespace. */
  #kill(): void {
    if (this.#gone === undefined) this.#gone = new Error("the resident sandbox ended: it was killed");
    // bwrap then reaps it and exits. Before bwrap reported its child, its process group (the launcher made
    // bwrap lead one) holds everything.
    const targets =
      this.#agentPid !== undefined ? [this.#agentPid] : this.#launched ? [-this.#launched.pid, this.#launched.pid] : [];
    for (const target of targets) {
      try {
        process.kill(target, "SIGKILL");
      } catch {
        // Already gone.
      }
    }
  }

  /**
   * Moves an output file of the io directory to where the caller wants it. The io directory is the sandbox's
   * (a command can replace its own stdout file there by a symlink to a host file, or by a FIFO): the file is
   * first moved out of its reach, then taken only if it is a regular file; anything else gives an empty file.
   */
  #deliver(name: string, target: string): void {
    const held = join(this.#controlDir, name);
    try {
      renameSync(join(this.#ioDir, name), held);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
      // The agent could not create it (the command never started): empty, as for a silent command.
      writeFileSync(target, "");
      return;
    }
    if (!lstatSync(held).isFile()) {
      rmSync(held, { recursive: true, force: true });
      writeFileSync(target, "");
      return;
    }
    try {
      renameSync(held, target);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EXDEV") throw error;
      copyFileSync(held, target);
      unlinkSync(held);
    }
  }
}

function checkCommand(argv: string[], env: { name: string; value: string }[]): void {
  if (argv.length === 0) throw new Error("argv is empty");
  const strings = [...argv, ...env.flatMap(({ name, value }) => [name, value])];
  if (strings.some((s) => s.includes("\0"))) throw new Error("argv and env must not contain NUL characters");
  const badName = env.find(({ name }) => name === "" || name.includes("="));
  if (badName) throw new Error(`invalid environment variable name ${JSON.stringify(badName.name)}`);
}

function mkfifo(...paths: string[]): void {
  execFileSync("mkfifo", ["-m", "0600", "--", ...paths], { stdio: ["ignore", "ignore", "pipe"] });
}

function readOrEmpty(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function statOrUndefined(path: string): ReturnType<typeof statSync> | undefined {
  try {
    return statSync(path);
  } catch {
    return undefined;
  }
}
