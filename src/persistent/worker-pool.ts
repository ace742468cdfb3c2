/**
 * Worker processes kept between actions, by the spec's key: a request goes to
 * an idle process of its key, or to a new one while the caps allow (an idle
 * process of another key is stopped to make room), or waits. A process whose
 * request failed without an answer is replaced and the request sent once more;
 * a second failure fails the action. Idle processes are stopped after a while;
 * close() stops them all and returns once every one has exited.
 */
import { Code, StatusError } from "../status/status.js";
import type { WorkerProcessLauncher } from "./launcher.js";
import type { PersistentWorkerSpec } from "./persistent-action.js";
import { DEFAULT_MAX_RESPONSE_BYTES } from "./work-protocol.js";
import { WorkerProcess, WorkerProcessFailure, type WorkOptions } from "./worker-process.js";

export interface WorkerPoolLimits {
  /** Processes of one key (each takes one request at a time). */
  maxProcessesPerKey: number;
  /** Processes of all keys. */
  maxProcesses: number;
  /** An idle process is stopped after this long. */
  idleTimeoutMs: number;
  /** A larger WorkResponse condemns its process. */
  maxResponseBytes: number;
}

export const DEFAULT_WORKER_POOL_LIMITS: WorkerPoolLimits = {
  maxProcessesPerKey: 2,
  maxProcesses: 8,
  idleTimeoutMs: 5 * 60 * 1000,
  maxResponseBytes: DEFAULT_MAX_RESPONSE_BYTES,
};

export interface PersistentRunOptions extends WorkOptions {
  /** Lays out this action's input root in the process's own (the same directory on every request). */
  prepare?(inputRoot: string): Promise<void>;
  /** Reads the outputs while the process is still this action's. */
  collect?(inputRoot: string): Promise<void>;
}

export interface PersistentRunResult {
  exitCode: number;
  /** WorkResponse.output: what the action reports on stderr. */
  stderr: Buffer;
  pid: number;
  /** Requests the process had answered before this one (0: it was started for it). */
  previousRequests: number;
  /** The first process failed the request and a new one answered it. */
  retried: boolean;
}

interface Member {
  key: string;
  process: WorkerProcess;
  busy: boolean;
  lastUsed: number;
  idleTimer: NodeJS.Timeout | undefined;
}

interface Waiter {
  wake(): void;
}

export class PersistentWorkerPool {
  private readonly members = new Set<Member>();
  /** Processes being started, counted against the caps. */
  private readonly starting = new Map<string, number>();
  private waiters: Waiter[] = [];
  private closed = false;

  constructor(
    private readonly launcher: WorkerProcessLauncher,
    private readonly limits: WorkerPoolLimits = DEFAULT_WORKER_POOL_LIMITS,
  ) {}

  /** Processes running (busy or idle), by key. */
  processes(): { key: string; pid: number; busy: boolean }[] {
    return [...this.members].map((m) => ({ key: m.key, pid: m.process.pid, busy: m.busy }));
  }

  async run(spec: PersistentWorkerSpec, options: PersistentRunOptions = {}): Promise<PersistentRunResult> {
    let firstFailure: WorkerProcessFailure | undefined;
    for (;;) {
      const { member, started } = await this.acquire(spec, options);
      const previousRequests = member.process.answered;
      try {
        // A process started for this request had its inputs laid out before it started.
        if (!started) await options.prepare?.(member.process.inputRoot);
        const response = await member.process.work(spec.request, options);
        await options.collect?.(member.process.inputRoot);
        return {
          exitCode: response.exitCode,
          stderr: Buffer.from(response.output),
          pid: member.process.pid,
          previousRequests,
          retried: firstFailure !== undefined,
        };
      } catch (err) {
        if (this.closed) {
          throw new StatusError(Code.UNAVAILABLE, `the persistent worker pool was closed: ${(err as Error).message}`);
        }
        if (!(err instanceof WorkerProcessFailure)) throw err;
        if (firstFailure) {
          throw new StatusError(
            Code.UNAVAILABLE,
            `the persistent worker failed the request twice, in two processes: ${firstFailure.message}; then: ${err.message}`,
          );
        }
        firstFailure = err;
      } finally {
        await this.release(member);
      }
    }
  }

  /** Stops every process (a request in flight fails) and settles once all have exited. */
  async close(): Promise<void> {
    this.closed = true;
    for (const waiter of this.waiters) waiter.wake();
    this.waiters = [];
    const members = [...this.members];
    await Promise.all(members.map((m) => this.stop(m)));
    // Processes that were still starting are stopped by acquire as soon as they are up.
    while ([...this.starting.values()].some((n) => n > 0)) await new Promise((r) => setTimeout(r, 10));
    await Promise.all([...this.members].map((m) => this.stop(m)));
  }

  private async acquire(
    spec: PersistentWorkerSpec,
    { signal, prepare }: PersistentRunOptions,
  ): Promise<{ member: Member; started: boolean }> {
    for (;;) {
      if (this.closed) throw new StatusError(Code.UNAVAILABLE, "the persistent worker pool is closed");
      if (signal?.aborted)
        throw new StatusError(Code.CANCELLED, "the action was cancelled while waiting for a worker process");
      const idle = [...this.members].find((m) => m.key === spec.key && !m.busy && m.process.usable);
      if (idle) {
        this.take(idle);
        return { member: idle, started: false };
      }
      if (this.makeRoom(spec.key)) return { member: await this.start(spec, prepare), started: true };
      await this.waitForChange(signal);
    }
  }

  /** Whether a process of `key` may start now, after stopping the least recently used idle process if needed. */
  private makeRoom(key: string): boolean {
    const ofKey = [...this.members].filter((m) => m.key === key).length + (this.starting.get(key) ?? 0);
    if (ofKey >= this.limits.maxProcessesPerKey) return false;
    const total = this.members.size + [...this.starting.values()].reduce((a, b) => a + b, 0);
    if (total < this.limits.maxProcesses) return true;
    const idle = [...this.members].filter((m) => !m.busy).sort((a, b) => a.lastUsed - b.lastUsed)[0];
    if (!idle) return false;
    void this.stop(idle);
    return true;
  }

  private async start(
    spec: PersistentWorkerSpec,
    prepare: ((inputRoot: string) => Promise<void>) | undefined,
  ): Promise<Member> {
    this.starting.set(spec.key, (this.starting.get(spec.key) ?? 0) + 1);
    let process: WorkerProcess;
    try {
      process = await WorkerProcess.start(
        this.launcher,
        spec.launch,
        spec.protocol,
        this.limits.maxResponseBytes,
        prepare,
      );
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== "ENOENT" && code !== "EACCES" && code !== "ENOEXEC") throw err;
      throw new StatusError(
        Code.INVALID_ARGUMENT,
        `Command.arguments: the persistent worker ${JSON.stringify(spec.launch.argv[0])} could not be started: ${(err as Error).message}`,
      );
    } finally {
      this.starting.set(spec.key, (this.starting.get(spec.key) ?? 1) - 1);
      this.notify();
    }
    const member: Member = { key: spec.key, process, busy: true, lastUsed: Date.now(), idleTimer: undefined };
    this.members.add(member);
    void process.exited.then(() => {
      this.members.delete(member);
      clearTimeout(member.idleTimer);
      this.notify();
    });
    if (this.closed) {
      await this.stop(member);
      throw new StatusError(Code.UNAVAILABLE, "the persistent worker pool is closed");
    }
    return member;
  }

  private take(member: Member): void {
    member.busy = true;
    clearTimeout(member.idleTimer);
    member.idleTimer = undefined;
  }

  /** Makes the process idle again, or, when it cannot take another request, returns once it has exited. */
  private async release(member: Member): Promise<void> {
    member.busy = false;
    member.lastUsed = Date.now();
    if (!member.process.usable || this.closed) {
      await this.stop(member);
      return;
    }
    member.idleTimer = setTimeout(() => void this.stop(member), this.limits.idleTimeoutMs);
    member.idleTimer.unref();
    this.notify();
  }

  private async stop(member: Member): Promise<void> {
    // Never taken again, and counted against the caps until it has exited.
    member.busy = true;
    clearTimeout(member.idleTimer);
    await member.process.stop();
    this.members.delete(member);
    this.notify();
  }

  /** Wakes every waiter: each looks again for a process of its key or room for one. */
  private notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter.wake();
  }

  private waitForChange(signal: AbortSignal | undefined): Promise<void> {
    return new Promise((resolve) => {
      const waiter: Waiter = {
        wake: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        },
      };
      const onAbort = () => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        resolve();
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }
}
