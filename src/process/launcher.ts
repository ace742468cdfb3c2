import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import type { Socket } from "node:net";
import { createInterface } from "node:readline";
import type { Readable, Writable } from "node:stream";
import { fileURLToPath } from "node:url";

/** Something the launcher does in the new process, in order, before it switches user and execs. */
export type LaunchStep =
  /** A mount namespace of its own, with every mount private to it. */
  | { kind: "private" }
  | { kind: "mount"; source: string; target: string; type: string; flags: number; data: string }
  | { kind: "mkdir"; path: string }
  | { kind: "chdir"; path: string }
  /** setrlimit(2) before the switch of user, so the program cannot raise the hard limit again. */
  | { kind: "rlimit"; resource: number; soft: number; hard: number }
  /** Joins the cgroup whose `cgroup.procs` file this is; everything the program starts stays in it. */
  | { kind: "cgroup"; procsFile: string }
  /** A network namespace of its own, reaching out through slirp4netns (never to the host's loopback). */
  | { kind: "netns"; slirp4netnsPath: string }
  /** Its /proc/self/oom_score_adj (only ever raised: lowering it needs CAP_SYS_RESOURCE). */
  | { kind: "oomScoreAdj"; value: number };

/** setrlimit(2) resource numbers, the same on every architecture Linux's generic headers cover (x86_64, arm64). */
export const RLIMIT = { FSIZE: 1, CORE: 4, NPROC: 6, NOFILE: 7, AS: 9 } as const;

export interface LaunchRequest {
  argv: string[];
  /** The whole environment of the started program. */
  env: Record<string, string>;
  /** Host user and group it runs as; root's when absent. */
  user?: { uid: number; gid: number };
  /** Files opened (created, truncated) as its stdout, stderr and descriptor 3; stdin is /dev/null. */
  stdoutPath: string;
  stderrPath: string;
  fd3Path: string;
  /** A file opened read-only as descriptor 4 (for bwrap's --args), if any. */
  fd4Path?: string;
  steps: LaunchStep[];
}

export interface LaunchExit {
  /** The exit code, or null when a signal ended it. 126 when a step or the exec failed (reason on stderr). */
  code: number | null;
  signal: number | null;
}

export interface Launched {
  /** Also its process group: the program leads a new session. */
  pid: number;
  exited: Promise<LaunchExit>;
}

/** How launcher.pl starts what it writes on the stderr file when a step or the exec fails (exit code 126). */
export const LAUNCH_FAILED = "berth launcher: ";

/** mount(2) flags the steps use. */
export const MS_BIND = 0x1000;

const SCRIPT = fileURLToPath(new URL("./launcher.pl", import.meta.url));

/** System call numbers perl's syscall() needs; they differ between architectures (asm/unistd_64.h, asm-generic). */
const SYSCALLS: Partial<
  Record<NodeJS.Architecture, { mount: number; unshare: number; prlimit64: number; prctl: number }>
> = {
  x64: { mount: 165, unshare: 272, prlimit64: 302, prctl: 157 },
  arm64: { mount: 40, unshare: 97, prlimit64: 261, prctl: 167 },
};

interface Pending {
  started: (pid: number) => void;
  failed: (error: Error) => void;
  exited?: (exit: LaunchExit) => void;
}

export interface LauncherOptions {
  /**
   * `cgroup.procs` files the launcher itself joins when it starts, so that
   * everything it forks is born in that cgroup. Moving a process into a
   * cgroup takes a lock whose first taking after a pause waits for an RCU
   * grace period: about 8 ms per action here (cgroup v1, Linux 6.18), while
   * a fork inherits its parent's cgroup for nothing. (Its memory counts
   * against the cgroup's too: a few MB of perl.)
   */
  cgroupProcsFiles?: readonly string[];
}

/**
 * Starts processes through launcher.pl, a small long-lived process, instead
 * of forking this one (see that file for why). One launcher serves every
 * request made of it; it is started on first use and again after it dies,
 * and it exits, killing what it started, when this process does.
 */
export class Launcher {
  #child: ChildProcessWithoutNullStreams | undefined;
  readonly #pending = new Map<string, Pending>();
  readonly #cgroupProcsFiles: readonly string[];
  #nextId = 0;

  constructor(options: LauncherOptions = {}) {
    this.#cgroupProcsFiles = options.cgroupProcsFiles ?? [];
  }

  /** The launcher's own process id while it runs (a cgroup's kill-all spares it). */
  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Whether what it starts is born in these cgroups. */
  get cgroupProcsFiles(): readonly string[] {
    return this.#cgroupProcsFiles;
  }

  launch(request: LaunchRequest): Promise<Launched> {
    const fields = encode(request);
    const bad = fields.find((field) => field.includes("\0"));
    if (bad !== undefined) return Promise.reject(new Error(`a launch argument contains a NUL character: ${bad}`));
    const child = this.#ensure();
    const id = String(this.#nextId++);
    return new Promise<Launched>((resolveStart, rejectStart) => {
      let resolveExit: (exit: LaunchExit) => void = () => {};
      let rejectExit: (error: Error) => void = () => {};
      const exited = new Promise<LaunchExit>((done, fail) => {
        resolveExit = done;
        rejectExit = fail;
      });
      // Nobody awaits `exited` when the start fails.
      exited.catch(() => {});
      let started = false;
      this.#pending.set(id, {
        started: (pid) => {
          started = true;
          resolveStart({ pid, exited });
        },
        failed: (error) => (started ? rejectExit(error) : rejectStart(error)),
        exited: resolveExit,
      });
      if (this.#pending.size === 1) pipe(child.stdout).ref();
      const all = [id, ...fields];
      child.stdin.write(`${all.length}\0${all.join("\0")}\0`);
    });
  }

  /** Stops the launcher (killing whatever it still runs). */
  close(): void {
    this.#child?.stdin.end();
    this.#child = undefined;
  }

  #ensure(): ChildProcessWithoutNullStreams {
    if (this.#child) return this.#child;
    const numbers = SYSCALLS[process.arch];
    if (!numbers) throw new Error(`the sandbox launcher does not know the system calls of ${process.arch}`);
    const syscalls = [numbers.mount, numbers.unshare, numbers.prlimit64, numbers.prctl].map(String);
    const child = spawn("perl", [SCRIPT, ...syscalls], {
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.#child = child;
    if (this.#cgroupProcsFiles.length > 0 && child.pid !== undefined) {
      try {
        // Before it forks anything (no request has been written to it yet).
        for (const procs of this.#cgroupProcsFiles) writeFileSync(procs, String(child.pid));
      } catch (error) {
        child.kill("SIGKILL");
        this.#child = undefined;
        throw new Error(`the sandbox launcher could not join its cgroup: ${(error as Error).message}`);
      }
    }
    let stderr = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk: string) => {
      stderr = (stderr + chunk).slice(-2000);
    });
    child.stdin.on("error", () => {}); // Reported through "close" below.
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => this.#receive(line));
    const gone = (reason: string) => {
      if (this.#child === child) this.#child = undefined;
      const error = new Error(`the sandbox launcher ${reason}${stderr ? `: ${stderr.trim()}` : ""}`);
      for (const pending of this.#pending.values()) pending.failed(error);
      this.#pending.clear();
    };
    child.once("error", (error) => gone(`could not start (${error.message})`));
    child.once("close", (code, signal) => gone(`exited (${signal ?? `code ${code}`})`));
    // Idle, it must not keep this process alive; `launch` refs its output while something runs.
    child.unref();
    for (const stream of [child.stdin, child.stdout, child.stderr]) pipe(stream).unref();
    return child;
  }

  #receive(line: string): void {
    const [kind, id = "", ...rest] = line.split(" ");
    const pending = this.#pending.get(id);
    if (!pending) return;
    if (kind === "started") {
      pending.started(Number(rest[0]));
      return;
    }
    this.#pending.delete(id);
    if (this.#pending.size === 0 && this.#child) pipe(this.#child.stdout).unref();
    if (kind === "exited") {
      const code = Number(rest[0]);
      const signal = Number(rest[1]);
      pending.exited?.(signal === 0 ? { code, signal: null } : { code: null, signal });
    } else {
      pending.failed(new Error(`the sandbox launcher could not start ${id}: ${rest.join(" ")}`));
    }
  }
}

/** A child's stdio pipes are sockets, which can stop keeping the event loop alive. */
function pipe(stream: Readable | Writable): Socket {
  return stream as Socket;
}

let shared: Launcher | undefined;

/** The launcher every part of this process uses. */
export function sharedLauncher(): Launcher {
  shared ??= new Launcher();
  return shared;
}

/** The request as launcher.pl's fields (after the id). */
function encode(request: LaunchRequest): string[] {
  const steps = request.steps.flatMap((step): string[] => {
    if (step.kind === "private") return ["private"];
    if (step.kind === "mount") return ["mount", step.source, step.target, step.type, String(step.flags), step.data];
    if (step.kind === "rlimit") return ["rlimit", String(step.resource), String(step.soft), String(step.hard)];
    if (step.kind === "cgroup") return ["cgroup", step.procsFile];
    if (step.kind === "netns") return ["netns", step.slirp4netnsPath];
    if (step.kind === "oomScoreAdj") return ["oom_score_adj", String(step.value)];
    return [step.kind, step.path];
  });
  const env = Object.entries(request.env).map(([name, value]) => `${name}=${value}`);
  return [
    String(request.user?.uid ?? -1),
    String(request.user?.gid ?? -1),
    request.stdoutPath,
    request.stderrPath,
    request.fd3Path,
    request.fd4Path ?? "",
    String(request.steps.length),
    ...steps,
    String(request.argv.length),
    ...request.argv,
    String(env.length),
    ...env,
  ];
}
