import { chownSync, constants as fsConstants, mkdirSync, openSync, readFileSync, rmSync, statSync } from "node:fs";
import { Socket } from "node:net";
import { isAbsolute, join, relative, resolve, sep } from "node:path";
import type { Readable, Writable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { LAUNCH_FAILED, type Launched, type Launcher, type LaunchStep, sharedLauncher } from "../process/launcher.js";
import { type ActionRoot, HOST_ROOT } from "./action-root.js";
import { AgentChannel, mkfifo } from "./agent-channel.js";
import { AGENT_PROGRAM, agentProgramDir } from "./agent-program.js";
import { type BubblewrapSandboxOptions, parseStatus, reachedLimit, waitForSandboxEnd } from "./bubblewrap.js";
import { DEFAULT_USER } from "./bwrap-args.js";
import { DiskMonitor } from "./disk-monitor.js";
import { DEFAULT_LIMITS, describeLimit, limitSteps, type SandboxLimits } from "./limits.js";
import { uidProcesses } from "./open-deleted-files.js";
import { IO_MOUNT, maskableFiles, type ResidentLayout, residentLayout } from "./resident-layout.js";
import { deliverOutput } from "./resident-output.js";
import type { SandboxRequest, SandboxResult, SandboxUser } from "./sandbox.js";

/** The bwrap path, host ids, limits, cgroup, slirp4netns and masked files are as in BubblewrapSandboxOptions. */
export interface ResidentSandboxOptions extends BubblewrapSandboxOptions {
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
  /** What starts bwrap; the process's shared launcher when absent (the sandbox then joins `cgroup` itself). */
  launcher?: Launcher;
}

/**
 * One command for a resident sandbox: `SandboxRequest` without what was fixed when the sandbox started.
 * The stdout and stderr files are moved there when the command ends; a process the command left running may
 * still hold them open and write on (up to worker.limits.maxFileSizeBytes; once the caller has deleted them,
 * the disk monitor counts them as deleted files the sandbox holds open): read them right after the run.
 * Aborting `signal` kills the command, and with it the sandbox.
 */
export type ResidentRunRequest = Pick<
  SandboxRequest,
  "workingDirectory" | "argv" | "env" | "timeoutMs" | "stdoutPath" | "stderrPath" | "signal"
>;

/** How a command in a resident sandbox ended. */
export interface ResidentRunResult extends SandboxResult {
  /**
   * When the command's end was seen, no process but the agent was left in the sandbox (nothing the command or
   * an earlier one started ran on): nothing of the sandbox can write any more unless it is asked to run
   * something, so what the commands wrote may be read before the sandbox is closed. False after a timeout or
   * a cancellation (the sandbox has then ended).
   */
  aloneAfter: boolean;
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
/**
 * Starts a bubblewrap sandbox that stays: its first process, the agent (agent.c), runs commands in it on
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

/**
 * A started resident sandbox. Commands run one after another or side by side; processes a command leaves
 * running stay until `close()` (a warm runner's state). Its commands share its uid, its /tmp and its
 * namespaces: everything a command does is visible to the next, which is why a sandbox is reused only for the
 * same key. A command cannot reach the agent to run anything as anyone else (see agent.c); at worst it breaks
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
  #channel: AgentChannel | undefined;
  #layout: ResidentLayout | undefined;
  #launched: Launched | undefined;
  /** What started the sandbox; it makes the FIFOs of spawnPiped too. */
  #launcher: Launcher | undefined;
  #agentPid: number | undefined;
  #pidNamespace: number | undefined;
  #nextId = 0;
  /** Why the sandbox cannot run anything any more. */
  #gone: Error | undefined;
  #closed = false;
  #madeStateDir = false;
  #ended: Promise<void> | undefined;

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
    // The control directory is root's alone and never bound into the sandbox; the io directory is the
    // action's user's, bound at IO_MOUNT for the agent to create output files in.
    mkdirSync(options.stateDir, { mode: 0o700 });
    this.#madeStateDir = true;
    mkdirSync(this.#controlDir, { mode: 0o700 });
    mkdirSync(this.#ioDir, { mode: 0o700 });
    chownSync(this.#ioDir, this.#uid, this.#gid);
    // As in BubblewrapSandbox: a sandbox with a network is started outside the cgroup, which it then joins.
    const launcher = options.network ? sharedLauncher() : (options.launcher ?? sharedLauncher());
    this.#launcher = launcher;
    const channel = await AgentChannel.open(this.#controlDir, launcher, (reason) => {
      this.#gone ??= new Error(`the resident sandbox ended: ${reason}`);
    });
    this.#channel = channel;

    const user = options.user ?? DEFAULT_USER;
    const root = options.root ?? HOST_ROOT;
    const masked = root.kind === "host" ? maskableFiles(options.maskedFiles ?? [], this.#uid, this.#gid) : [];
    const layout = await residentLayout({
      root,
      agentDir: agentProgramDir(),
      inputRoot: resolve(options.inputRoot),
      ioDir: this.#ioDir,
      uid: this.#uid,
      user,
      network: options.network ?? false,
      limits: this.#limits,
      masked,
    });
    this.#layout = layout;
    const launcherInCgroup = launcher.cgroupProcsFiles.length > 0;
    const steps: LaunchStep[] = [
      ...(options.network
        ? [{ kind: "netns", slirp4netnsPath: options.slirp4netnsPath ?? "slirp4netns" } as const]
        : []),
      ...layout.steps,
      ...limitSteps(this.#limits, options.cgroup, { launcherInCgroup }),
    ];
    const bwrap = options.bwrapPath ?? "bwrap";
    const agentErr = join(this.#controlDir, "agent.err");
    const statusPath = join(this.#controlDir, "status");
    this.#launched = await launcher
      .launch({
        argv: [bwrap, ...layout.bwrapOptions, "--", AGENT_PROGRAM, layout.commandRoot],
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
        user: { uid: this.#uid, gid: this.#gid },
        stdoutPath: channel.replyPath,
        stderrPath: agentErr,
        fd3Path: statusPath,
        fd4Path: channel.requestPath,
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
    const timer = setTimeout(() => channel.lose("its agent did not start"), START_LIMIT_MS);
    try {
      await channel.ready;
    } catch (error) {
      const said = readOrEmpty(agentErr).replaceAll(LAUNCH_FAILED, "").trim();
      throw new Error(`cannot start a resident sandbox: ${said || (error as Error).message}`, { cause: error });
    } finally {
      clearTimeout(timer);
      // Both ends are open now: the pipes keep no name anyone could open them by.
      channel.unlink();
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
  async run(request: ResidentRunRequest): Promise<ResidentRunResult> {
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
      const command = { stdin: "/dev/null", stdout: join(IO_MOUNT, out), stderr: join(IO_MOUNT, err), cwd };
      const { code: exitCode, alone } = await this.#agent().run(id, {
        ...command,
        argv: request.argv,
        env: request.env,
      });
      const completedAt = new Date();
      deliverOutput(this.#ioDir, this.#controlDir, out, request.stdoutPath);
      if (!sameFile) deliverOutput(this.#ioDir, this.#controlDir, err, request.stderrPath);
      const limit =
        (await disk.finish()) ??
        (exitCode === 0
          ? undefined
          : reachedLimit(exitCode, before, this.#options.cgroup?.events(), request.stderrPath));
      return {
        exitCode,
        timedOut: false,
        cancelled: false,
        aloneAfter: alone,
        startedAt,
        completedAt,
        ...(limit ? { limitReached: { limit, message: describeLimit(limit, this.#limits) } } : {}),
      };
    } catch (error) {
      if (ending === undefined) throw error;
      // Ended on purpose: the result is the command's, killed, once nothing of the sandbox runs.
      await this.#ended;
      deliverOutput(this.#ioDir, this.#controlDir, out, request.stdoutPath);
      if (!sameFile) deliverOutput(this.#ioDir, this.#controlDir, err, request.stderrPath);
      const limit = ending === "disk" ? await disk.finish() : undefined;
      return {
        exitCode: KILLED,
        timedOut: ending === "timeout",
        cancelled: ending === "cancel",
        aloneAfter: false,
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
    await mkfifo(this.#launcher ?? sharedLauncher(), paths, this.#controlDir);
    for (const path of paths) chownSync(path, this.#uid, this.#gid);
    const [inPath, outPath, errPath] = paths as [string, string, string];
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
    const [stdinMount, stdoutMount, stderrMount] = names.map((name) => join(IO_MOUNT, name)) as [
      string,
      string,
      string,
    ];
    const command = { stdin: stdinMount, stdout: stdoutMount, stderr: stderrMount, cwd, argv, env };
    const agent = this.#agent();
    let failure: Error | undefined;
    const exited = agent
      .run(id, command, () => {
        started = true;
        onStart();
      })
      .then(
        ({ code }) => code,
        (error: Error) => {
          failure = error;
          return KILLED;
        },
      );
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
        if (this.usable) agent.kill(id);
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
    this.#channel?.close();
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

  /** The sandbox can run nothing more: every command still waited for fails with `reason`. */
  #lose(reason: string): void {
    this.#gone ??= new Error(`the resident sandbox ended: ${reason}`);
    this.#channel?.lose(reason);
  }

  #agent(): AgentChannel {
    return this.#channel as AgentChannel;
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
}

function checkCommand(argv: string[], env: { name: string; value: string }[]): void {
  if (argv.length === 0) throw new Error("argv is empty");
  const strings = [...argv, ...env.flatMap(({ name, value }) => [name, value])];
  if (strings.some((s) => s.includes("\0"))) throw new Error("argv and env must not contain NUL characters");
  const badName = env.find(({ name }) => name === "" || name.includes("="));
  if (badName) throw new Error(`invalid environment variable name ${JSON.stringify(badName.name)}`);
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
