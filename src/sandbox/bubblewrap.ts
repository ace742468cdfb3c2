import {
  closeSync,
  lstatSync,
  openSync,
  readFileSync,
  readlinkSync,
  readSync,
  rmSync,
  type Stats,
  statSync,
  writeFileSync,
} from "node:fs";
import { open } from "node:fs/promises";
import { constants } from "node:os";
import { dirname, isAbsolute, relative, resolve, sep } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { LAUNCH_FAILED, Launcher, type LaunchStep, sharedLauncher } from "../process/launcher.js";
import { Code, StatusError } from "../status/status.js";
import { HOST_ROOT } from "./action-root.js";
import { DEFAULT_USER, sandboxArgs } from "./bwrap-args.js";
import type { CgroupEvents, SlotCgroup } from "./cgroups.js";
import { DiskMonitor } from "./disk-monitor.js";
import type { WritableArea } from "./disk-usage.js";
import { inputRootAsRootSetup } from "./input-root-as-root.js";
import { DEFAULT_LIMITS, describeLimit, type LimitName, limitSteps, type SandboxLimits } from "./limits.js";
import { cgroupProcesses, type ProcessLister, uidProcesses } from "./open-deleted-files.js";
import { overlayRootSetup } from "./overlay-root.js";
import type { Sandbox, SandboxRequest, SandboxResult } from "./sandbox.js";
import { bindSteps, stagingSteps } from "./staging.js";

export interface BubblewrapSandboxOptions {
  /** Default "bwrap", looked up in the worker's PATH. */
  bwrapPath?: string;
  /**
   * The unprivileged host user and group the action runs as; default 65534/65534 (nobody/nogroup). A worker
   * gives each executor slot a uid of its own (worker.sandboxUidBase + slot): rlimits such as RLIMIT_NPROC
   * count per uid, and a process can signal only processes of its own uid.
   */
  uid?: number;
  gid?: number;
  /** Bounds of each action; DEFAULT_LIMITS when absent. */
  limits?: SandboxLimits;
  /** The slot's cgroup, bounding memory and processes and reporting when they ran out (see cgroups.ts). */
  cgroup?: SlotCgroup;
  /** For actions with network access: default "slirp4netns", looked up in the worker's PATH. */
  slirp4netnsPath?: string;
  /**
   * Host files that hold the farm's secrets (worker tokens, TLS keys, …): on the host root, /dev/null is
   * bound over each, on a nodev mount, so the action cannot open them at all (EACCES). They are private to
   * root already (auth/private-file.ts); this is a second wall.
   */
  maskedFiles?: readonly string[];
  /**
   * What starts bwrap: the slot's launcher, living in its cgroup (see Launcher), which the slot's sandboxes
   * made ahead share; when absent, one of its own for a slot with a cgroup, else the process's shared one.
   */
  launcher?: Launcher;
}

const NOBODY = 65534;
const EXEC_FAILED = 127;
const STATUS_FD = 3;
/** The descriptor the argument shim reads the command line from. */
const ARGS_FD = 4;
/**
 * bwrap refuses a command line of more than 9,000 arguments, its own options and the command's together
 * (also through --args). Past this many, the command's arguments go in a file instead (see ARGS_SHIM).
 */
const DIRECT_ARGS_LIMIT = 8000;
/**
 * Run by bwrap in place of a long command: reads the NUL-separated command line from descriptor 4 (a file the
 * launcher opened), closes it and execs it, with argv[0] looked up in the action's PATH as REAPI says. perl is
 * part of every Debian system (perl-base); it is found on the host's root, which the sandbox shows read-only.
 */
const ARGS_SHIM = [
  "/usr/bin/perl",
  "-e",
  `open(my $f, "<&=", ${ARGS_FD}) or die "berth: descriptor ${ARGS_FD}: $!\n"; local $/ = "\\0"; my @a = <$f>; ` +
    `close $f; chomp @a; { no warnings "exec"; exec { $a[0] } @a; } print STDERR "bwrap: execvp $a[0]: $!\n"; exit 127;`,
];
/** Where the action sees its input root. */
export const INPUT_ROOT_MOUNT = "/run/berth/execroot";
/** Longest delay setTimeout accepts. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** How long a look at which secret files to mask stays good (see #maskableNow). */
const MASKABLE_TTL_MS = 5_000;
/** A process stuck in uninterruptible sleep can outlive SIGKILL; don't block the worker forever on it. */
const REAP_LIMIT_MS = 10_000;

type KillReason = "timeout" | "cancel" | "disk";

/**
 * Runs the command with bubblewrap, started as an unprivileged host user: bubblewrap then creates the user
 * namespace itself, so the action holds no privilege over root's files (as it would in a user namespace created
 * by root). bwrap is started through the launcher (launcher.ts), which also makes the mounts bwrap's user could
 * not. See `SandboxRequest` for what the caller must prepare.
 */
export class BubblewrapSandbox implements Sandbox {
  readonly #bwrapPath: string;
  readonly #uid: number;
  readonly #gid: number;
  readonly #reachableParents = new Map<string, boolean>();
  /** For a slot with a cgroup, a launcher of its own living in it; else the process's shared one. */
  readonly #launcher: Launcher;
  readonly #limits: SandboxLimits;
  readonly #cgroup: SlotCgroup | undefined;
  readonly #slirp4netnsPath: string;
  readonly #maskedFiles: readonly string[];
  #masked: { at: number; paths: string[] } | undefined;

  constructor(options: BubblewrapSandboxOptions = {}) {
    this.#bwrapPath = options.bwrapPath ?? "bwrap";
    this.#uid = options.uid ?? NOBODY;
    this.#gid = options.gid ?? NOBODY;
    this.#limits = options.limits ?? DEFAULT_LIMITS;
    this.#cgroup = options.cgroup;
    this.#launcher = options.launcher ?? (options.cgroup ? slotLauncher(options.cgroup) : sharedLauncher());
    this.#slirp4netnsPath = options.slirp4netnsPath ?? "slirp4netns";
    this.#maskedFiles = options.maskedFiles ?? [];
  }

  async run(request: SandboxRequest): Promise<SandboxResult> {
    const actionRoot = request.root ?? HOST_ROOT;
    // In a chroot the working directory is looked up by the kernel inside it; on the host a path through the
    // client's absolute symlinks would lead elsewhere (the worker checked it inside the input root).
    const { root, workDir } = await checkRequest(request, actionRoot.kind !== "input-root");
    const sizes = { tmpSizeBytes: this.#limits.tmpSizeBytes, shmSizeBytes: this.#limits.shmSizeBytes };
    if (actionRoot.kind !== "host") {
      if (request.argv.length > DIRECT_ARGS_LIMIT) {
        // The argument shim needs the host's perl, which no other root shows.
        throw new StatusError(
          Code.INVALID_ARGUMENT,
          `command.arguments: ${request.argv.length} arguments; an action whose root is not the host's ` +
            `(a container image, or its input root) may have at most ${DIRECT_ARGS_LIMIT}`,
        );
      }
      const setup =
        actionRoot.kind === "overlay" ? await overlayRootSetup(actionRoot, root) : inputRootAsRootSetup(root);
      const args = sandboxArgs(request, {
        ...setup.layout,
        workDirInRoot: relative(root, workDir),
        user: request.user ?? DEFAULT_USER,
        statusFd: STATUS_FD,
        ...sizes,
        command: request.argv,
      });
      const areas = [{ dir: root, owner: this.#uid }, ...setup.areas];
      return this.#execute(request, [this.#bwrapPath, ...args], setup.steps, undefined, areas);
    }
    // The action's user must reach the input root to bind it. When a directory above it is closed to that
    // user (a data directory under /root, say), root binds it first in a private mount namespace, at a
    // path the user can reach, and only then becomes that user. Neither mount is visible on the host.
    const direct = await this.#reachable(root);
    const source = direct ? root : INPUT_ROOT_MOUNT;
    const steps = direct ? [] : [...stagingSteps(), ...bindSteps(root, INPUT_ROOT_MOUNT)];
    const longCommand = request.argv.length > DIRECT_ARGS_LIMIT;
    const command = longCommand ? ARGS_SHIM : request.argv;
    const masked = this.#maskableNow();
    const argv = [this.#bwrapPath, ...bwrapArgs(request, source, root, workDir, { ...sizes, command, masked })];
    const areas = [{ dir: root, owner: this.#uid }];
    return this.#execute(request, argv, steps, longCommand ? request.argv : undefined, areas);
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

  /**
   * The secret files an action could open: those that exist (bwrap cannot make a mount point on the read-only
   * root) below directories the action's user may search. bwrap, running as that user, could not reach the
   * others to cover them, and the action cannot reach them either (a data directory is 0700).
   */
  #maskable(paths: readonly string[]): string[] {
    const found: string[] = [];
    for (const path of paths) {
      let isFile = false;
      try {
        isFile = lstatSync(path).isFile();
      } catch {
        // Gone: nothing to cover.
      }
      if (!isFile) continue;
      let reachable = true;
      for (let dir = dirname(path); reachable; dir = dirname(dir)) {
        try {
          reachable = this.#searchable(dir);
        } catch {
          reachable = false;
        }
        if (dir === dirname(dir)) break;
      }
      if (reachable) found.push(path);
    }
    return found;
  }

  /**
   * #maskable, looked at again at most every MASKABLE_TTL_MS: the secret files and the modes above them
   * change when an operator changes them, not between two actions, and each look is a few system calls per
   * file and directory on the worker's one thread, between an action's arrival and its start.
   */
  #maskableNow(): string[] {
    const now = Date.now();
    if (!this.#masked || now - this.#masked.at > MASKABLE_TTL_MS) {
      this.#masked = { at: now, paths: this.#maskable(this.#maskedFiles) };
    }
    return this.#masked.paths;
  }

  #searchable(dir: string): boolean {
    const info = statSync(dir);
    return (
      (info.uid === this.#uid && (info.mode & 0o100) !== 0) ||
      (info.gid === this.#gid && (info.mode & 0o010) !== 0) ||
      (info.mode & 0o001) !== 0
    );
  }

  async #execute(
    request: SandboxRequest,
    argv: string[],
    sandboxSteps: LaunchStep[],
    shimmedCommand: string[] | undefined,
    writableAreas: WritableArea[],
  ): Promise<SandboxResult> {
    // bwrap reports the sandbox's pid and the command's exit code on STATUS_FD, here a file beside stdout.
    const statusPath = `${request.stdoutPath}.bwrap-status`;
    const argsPath = `${request.stdoutPath}.bwrap-args`;
    if (shimmedCommand) writeFileSync(argsPath, `${shimmedCommand.join("\0")}\0`, { mode: 0o600 });
    // A network namespace of the action's own is made first: slirp4netns, its helper, stays out of the
    // slot's cgroup and rlimits (an action's process bomb must not starve it), so such an action is started
    // by the shared launcher, outside the cgroup, and joins the cgroup itself.
    const launcher = request.network ? sharedLauncher() : this.#launcher;
    const launcherInCgroup = launcher.cgroupProcsFiles.length > 0;
    const steps: LaunchStep[] = [
      ...(request.network ? [{ kind: "netns", slirp4netnsPath: this.#slirp4netnsPath } as const] : []),
      ...sandboxSteps,
      ...limitSteps(this.#limits, this.#cgroup, { launcherInCgroup }),
    ];
    const before = this.#cgroup?.events();
    const startedAt = new Date();
    const launched = await launcher
      .launch({
        argv,
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
        user: { uid: this.#uid, gid: this.#gid },
        stdoutPath: request.stdoutPath,
        stderrPath: request.stderrPath,
        fd3Path: statusPath,
        fd4Path: shimmedCommand ? argsPath : undefined,
        steps,
      })
      .catch((error: Error) => {
        rmSync(argsPath, { force: true });
        throw new Error(`cannot start bubblewrap (${this.#bwrapPath}): ${error.message}`, { cause: error });
      });

    let killedFor: KillReason | undefined;
    const kill = (reason: KillReason) => {
      if (killedFor !== undefined) return;
      killedFor = reason;
      // The launcher makes bwrap lead its own process group, which reaches every sandbox process that has
      // not called setsid itself; just after the start, the group may not exist yet.
      for (const target of [-launched.pid, launched.pid]) {
        try {
          process.kill(target, "SIGKILL");
          return;
        } catch {
          // Not yet a group leader, or already gone.
        }
      }
    };
    const timeoutMs = request.timeoutMs > 0 ? Math.min(request.timeoutMs, MAX_TIMER_MS) : undefined;
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => kill("timeout"), timeoutMs);
    const onAbort = () => kill("cancel");
    request.signal?.addEventListener("abort", onAbort, { once: true });
    if (request.signal?.aborted) onAbort();
    const disk = new DiskMonitor({
      areas: writableAreas,
      bounds: { bytes: this.#limits.diskBytes, entries: this.#limits.diskEntries },
      // Every cgroup.procs file of the slot lists the same processes (v1 has one per hierarchy).
      processes: this.#cgroup?.procsFiles[0]
        ? this.#actionProcesses(cgroupProcesses(this.#cgroup.procsFiles[0]))
        : uidProcesses(this.#uid),
      onExceeded: () => kill("disk"),
    });

    try {
      const exit = await launched.exited;
      // The small files and /proc reads from here on are synchronous: on a busy machine each thread-pool
      // round trip would wait to be scheduled, and they all lie between the command's end and its result.
      const report = parseStatus(readOrEmpty(statusPath));
      if (report.childPid !== undefined && report.pidNamespace !== undefined) {
        await waitForSandboxEnd(report.childPid, report.pidNamespace);
      }
      // Whatever the sandbox left (it should be nothing: its PID namespace ended with it) goes with the
      // cgroup, also when bwrap never got as far as making that namespace.
      this.#cgroup?.killAll(this.#launcher.pid);
      const completedAt = new Date();
      const diskLimit = await disk.finish();

      // A command killed by a signal already shows up as 128 + n in bwrap's own exit code.
      let exitCode = exit.code ?? 128 + (exit.signal ?? constants.signals.SIGKILL);
      if (report.exitCode === undefined && killedFor === undefined) {
        // bwrap reports an exit code only for a command it managed to exec.
        const message = await readStart(request.stderrPath);
        if (request.network && message.includes(`${LAUNCH_FAILED}slirp4netns`)) {
          // The worker lacks what network access needs; another worker (or the operator) can fix that.
          throw new StatusError(
            Code.FAILED_PRECONDITION,
            `network: this worker cannot give the action a network of its own: ${message.replaceAll(LAUNCH_FAILED, "").trim()}`,
          );
        }
        if (message.startsWith(LAUNCH_FAILED)) {
          throw new Error(
            `cannot start bubblewrap (${this.#bwrapPath}): ${message.slice(LAUNCH_FAILED.length).trim()}`,
          );
        }
        if (!message.includes("bwrap: execvp ")) {
          throw new Error(`bubblewrap could not set up the sandbox: ${message.trim() || `exit code ${exitCode}`}`);
        }
        exitCode = EXEC_FAILED;
      }
      // A disk bound passed is named even when the command then exited 0: what it left is over the limit.
      const limitReached =
        diskLimit ??
        (exitCode === 0 || killedFor !== undefined
          ? undefined
          : reachedLimit(exitCode, before, this.#cgroup?.events(), request.stderrPath));
      return {
        exitCode,
        timedOut: killedFor === "timeout",
        cancelled: killedFor === "cancel",
        startedAt,
        completedAt,
        ...(limitReached
          ? { limitReached: { limit: limitReached, message: describeLimit(limitReached, this.#limits) } }
          : {}),
      };
    } finally {
      disk.stop();
      clearTimeout(timer);
      request.signal?.removeEventListener("abort", onAbort);
      rmSync(statusPath, { force: true });
      if (shimmedCommand) rmSync(argsPath, { force: true });
    }
  }

  /** The cgroup's processes but the slot's launcher. */
  #actionProcesses(all: ProcessLister): ProcessLister {
    return async () => (await all()).filter((pid) => pid !== this.#launcher.pid);
  }

  /** What the sandbox bounds each action to. */
  get limits(): SandboxLimits {
    return this.#limits;
  }
}

const SIGXFSZ = 25;
/** What tools print when a write finds no space, when a fork is refused, when a file is too large. */
const NO_SPACE = "No space left on device";
const FILE_TOO_LARGE = "File too large";

/**
 * The limit a failed action most likely ended at. The cgroup's counters are
 * exact; the rest is read from how the command ended (SIGXFSZ) and from what
 * tools print (the tmpfs sizes have no counter), so only an action that
 * failed is ever blamed on a limit.
 */
export function reachedLimit(
  exitCode: number,
  before: CgroupEvents | undefined,
  after: CgroupEvents | undefined,
  stderrPath: string,
): LimitName | undefined {
  if (before && after) {
    if (after.oomKills > before.oomKills) return "maxMemoryBytes";
    if (after.forkRefusals > before.forkRefusals) return "maxProcesses";
  }
  if (exitCode === 128 + SIGXFSZ) return "maxFileSizeBytes";
  const stderr = readTail(stderrPath);
  if (stderr.includes(FILE_TOO_LARGE)) return "maxFileSizeBytes";
  if (stderr.includes(NO_SPACE)) return "tmpSizeBytes";
  return undefined;
}

/** The last 64 KiB of a log file, where a tool's last complaint is. */
function readTail(path: string): string {
  let fd: number | undefined;
  try {
    fd = openSync(path, "r");
    const size = statSync(path).size;
    const buffer = Buffer.alloc(Math.min(size, 65536));
    const read = readSync(fd, buffer, 0, buffer.length, size - buffer.length);
    return buffer.toString("utf8", 0, read);
  } catch {
    return "";
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

async function checkRequest(request: SandboxRequest, statWorkDir: boolean): Promise<{ root: string; workDir: string }> {
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
  const isDirectory = !statWorkDir || (statOrUndefined(workDir)?.isDirectory() ?? false);
  if (!isDirectory) throw new Error(`working directory ${request.workingDirectory} does not exist in the input root`);
  return { root, workDir };
}

/** bwrap's command line for `request`, with `source` (the host path of `root`) bound at INPUT_ROOT_MOUNT. */
export function bwrapArgs(
  request: SandboxRequest,
  source: string,
  root: string,
  workDir: string,
  run: { tmpSizeBytes: number; shmSizeBytes: number; command: string[]; masked?: readonly string[] },
): string[] {
  const { masked = [], ...sizesAndCommand } = run;
  return sandboxArgs(request, {
    ...sizesAndCommand,
    // bwrap binds onto an existing file only (the host root is read-only): see BubblewrapSandbox.#maskable.
    root: ["--ro-bind", "/", "/", ...masked.flatMap((path) => ["--ro-bind", "/dev/null", path])],
    // The host's /run (sockets of system services, among them Docker's) is hidden; the input root is
    // bound there, at the same path whichever way it was reached.
    hide: ["/run"],
    inputSource: source,
    inputMount: INPUT_ROOT_MOUNT,
    workDirInRoot: relative(root, workDir),
    user: request.user ?? DEFAULT_USER,
    statusFd: STATUS_FD,
  });
}

export interface StatusReport {
  childPid?: number;
  pidNamespace?: number;
  exitCode?: number;
}

/** bwrap's --json-status-fd output: one JSON object per line. */
export function parseStatus(text: string): StatusReport {
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
export async function waitForSandboxEnd(pid: number, pidNamespace: number): Promise<void> {
  const deadline = Date.now() + REAP_LIMIT_MS;
  // Usually over within a millisecond or two of bwrap's exit, so the first waits are short.
  for (let wait = 1; Date.now() < deadline && !sandboxEnded(pid, pidNamespace); wait = Math.min(wait * 2, 5)) {
    await sleep(wait);
  }
}

function sandboxEnded(pid: number, pidNamespace: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2)[0];
    if (state === "Z" || state === "X") return true;
    // The pid may have been reused by an unrelated process.
    return readlinkSync(`/proc/${pid}/ns/pid`) !== `pid:[${pidNamespace}]`;
  } catch {
    return true;
  }
}

/**
 * A launcher living in the slot's cgroup: what it starts is in the cgroup from its first instruction, where
 * moving a process there afterwards (the shared launcher's way) costs a wait for the kernel's cgroup lock,
 * milliseconds to tens of them on a busy machine.
 */
export function slotLauncher(cgroup: SlotCgroup): Launcher {
  return new Launcher({ cgroupProcsFiles: cgroup.procsFiles });
}

function readOrEmpty(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function statOrUndefined(path: string): Stats | undefined {
  try {
    return statSync(path);
  } catch {
    return undefined;
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
