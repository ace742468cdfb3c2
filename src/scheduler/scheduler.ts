import { randomUUID } from "node:crypto";
import { type ActionEnvironment, environmentToWire } from "../action/action-environment.js";
import { type Property, unmetProperty } from "../action/property.js";
import { type Digest, digestKey } from "../digest/digest.js";
import type { Assignment, ImagePull } from "../gen/berth/worker/v1/worker.js";
import {
  type Action,
  type ActionResult,
  type BatchUpdateBlobsRequest_Request,
  type Command,
  Compressor_Value,
  type ExecuteResponse,
  ExecutionStage_Value,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Status } from "../gen/google/rpc/status.js";
import type { Credentials } from "../registry/credentials.js";
import { Code } from "../status/status.js";
import { Operation } from "./operation.js";

/** An action ready to run: validated, with its Action and Command fetched. */
export interface ExecutionJob {
  instanceName: string;
  actionDigest: Digest;
  action: Action;
  command: Command;
  /** What a worker must offer. */
  platform: Property[];
  /** What the action runs in (the host's root, an image pulled or expanded, its input root as "/"). */
  environment: ActionEnvironment;
  /** Parts of the input tree the worker gets with the assignment (Assignment.input_directories, input_files). */
  inputBlobs?: { directories: readonly StoredBlob[]; files: readonly StoredBlob[] };
  /** Credentials for the image's registry from the client's request header (never from the CAS); kept in memory only. */
  registryCredentials?: Credentials;
  /** Lower runs sooner, as REAPI's ExecutionPolicy.priority. */
  priority: number;
  timeoutMs: number;
  /** Such a job neither joins nor is joined by identical ones. */
  doNotCache: boolean;
  /** The warm runner it asked for (recycle-runner), by key (action/runner-recycling.ts); absent when none. */
  runnerKey?: string;
  queuedAt: Date;
}

/** A blob and its verified bytes. */
export interface StoredBlob {
  digest: Digest;
  data: Buffer;
}

/** What a worker reported for a job. */
export interface WorkerOutcome {
  status: Status;
  result: ActionResult | undefined;
}

/** The scheduler's side of one connected worker. */
export interface WorkerConnection {
  readonly name: string;
  readonly properties: readonly Property[];
  readonly slots: number;
  /**
   * Connections that die together (one worker process's streams share one
   * HTTP/2 connection): an action suspected of crashing its worker runs alone
   * in its group, so it takes no other action down with it.
   */
  readonly group?: string;
  assign(assignment: Assignment): void;
  cancel(leaseId: string): void;
  /** Asks the worker to pull an image into its store (only workers that run images are asked). */
  pullImage(pull: ImagePull): void;
}

export interface SchedulerOptions {
  /** A worker silent for this long has vanished; its actions are queued again. */
  leaseTimeoutMs: number;
  /** How many times an action may be started before a vanishing worker fails it. */
  maxAttempts: number;
  /** How long completed operations stay visible to WaitExecution and GetOperation. */
  retainCompletedMs: number;
  /** An operation no client has followed for this long is cancelled; undefined: never. */
  unwatchedTimeoutMs?: number;
  /**
   * An action asking for a warm runner that a busy worker holds waits up to
   * this long for that worker before any other takes it (0: never waits).
   */
  warmRunnerWaitMs?: number;
  /** Turns a worker's outcome into the client's response (and caches it). */
  finish: (job: ExecutionJob, outcome: WorkerOutcome) => Promise<ExecuteResponse>;
}

interface Task {
  readonly key: string;
  readonly job: ExecutionJob;
  readonly seq: number;
  readonly operations: Set<Operation>;
  attempts: number;
  /** Its last attempt ended with its worker vanishing: it may be what crashed it. */
  suspect: boolean;
  lease: { id: string; worker: WorkerState } | undefined;
}

interface WorkerState {
  readonly connection: WorkerConnection;
  readonly running: Map<string, Task>;
  lastSeen: number;
  /**
   * Another connection of its group dropped and this one has said nothing
   * since: it may be dead too (the process crashed, the drop of this stream
   * not seen yet), so nothing is assigned to it until it speaks.
   */
  doubtful: boolean;
  /** The keys of the idle warm runners it holds, as it last reported them. */
  warmKeys: ReadonlySet<string>;
}

/**
 * Queues jobs by priority (first in, first out within one), hands them to
 * workers whose properties satisfy them, and follows each to completion.
 * Identical jobs in flight share one execution.
 */
export class Scheduler {
  private readonly queue: Task[] = [];
  private readonly inFlight = new Map<string, Task>();
  private readonly workers = new Map<string, WorkerState>();
  /** Property sets of every worker seen, so a briefly absent platform is not refused. */
  private readonly knownPlatforms = new Map<string, readonly Property[]>();
  private readonly operations = new Map<string, { operation: Operation; task: Task | undefined }>();
  private seq = 0;
  private readonly sweeper: NodeJS.Timeout;
  private readonly unwatchedSweeper: NodeJS.Timeout | undefined;
  /** A dispatch when the first action held back for a warm runner has waited long enough. */
  private warmWaitTimer: { at: number; timer: NodeJS.Timeout } | undefined;

  constructor(private readonly options: SchedulerOptions) {
    this.sweeper = setInterval(() => this.expireLeases(), Math.max(100, options.leaseTimeoutMs / 4));
    this.sweeper.unref();
    const unwatched = options.unwatchedTimeoutMs;
    if (unwatched !== undefined) {
      this.unwatchedSweeper = setInterval(() => this.dropUnwatched(unwatched), Math.max(50, unwatched / 4));
      this.unwatchedSweeper.unref();
    }
  }

  close(): void {
    clearInterval(this.sweeper);
    clearInterval(this.unwatchedSweeper);
    clearTimeout(this.warmWaitTimer?.timer);
  }

  /** The first property no worker of the farm has offered, or undefined. */
  unsatisfiable(platform: readonly Property[]): Property | undefined {
    if (platform.length === 0) return undefined;
    let best: Property | undefined = platform[0];
    for (const offered of this.knownPlatforms.values()) {
      const unmet = unmetProperty(offered, platform);
      if (!unmet) return undefined;
      best = unmet;
    }
    return best;
  }

  /** A new operation in the CACHE_CHECK stage, visible to GetOperation and WaitExecution at once. */
  open(instanceName: string, actionDigest: Digest): Operation {
    const operation = new Operation(instanceName, actionDigest);
    this.remember(operation, undefined);
    return operation;
  }

  /** Queues `job` for `operation` (one from open(), or a new one), joining an identical job in flight. */
  submit(job: ExecutionJob, operation = this.open(job.instanceName, job.actionDigest)): Operation {
    if (operation.done) return operation; // cancelled while its cache lookup ran
    // Runs with different registry credentials are different runs: one caller's pull must not serve another.
    const identity = job.registryCredentials?.fingerprint() ?? "";
    const key = `${job.instanceName}\0${digestKey(job.actionDigest)}\0${identity}`;
    const existing = job.doNotCache ? undefined : this.inFlight.get(key);
    if (existing && !existing.job.doNotCache) {
      existing.operations.add(operation);
      this.track(operation, existing);
      operation.advance(existing.lease ? ExecutionStage_Value.EXECUTING : ExecutionStage_Value.QUEUED);
      return operation;
    }
    const task: Task = {
      key,
      job,
      seq: this.seq++,
      operations: new Set([operation]),
      attempts: 0,
      suspect: false,
      lease: undefined,
    };
    if (!job.doNotCache) this.inFlight.set(key, task);
    this.track(operation, task);
    operation.advance(ExecutionStage_Value.QUEUED);
    this.enqueue(task);
    this.dispatch();
    return operation;
  }

  getOperation(name: string): Operation | undefined {
    return this.operations.get(name)?.operation;
  }

  /** Cancels one client's operation; the action stops when no other client waits for it. */
  cancel(name: string, why = "the operation was cancelled"): boolean {
    const entry = this.operations.get(name);
    if (!entry || entry.operation.done) return entry !== undefined;
    const { operation, task } = entry;
    operation.complete(failure(Code.CANCELLED, why));
    if (task) {
      task.operations.delete(operation);
      if (task.operations.size === 0) this.abandon(task);
    }
    return true;
  }

  /** The workers connected now. */
  connectedWorkers(): WorkerConnection[] {
    return [...this.workers.values()].map((worker) => worker.connection);
  }

  connect(connection: WorkerConnection): void {
    this.workers.set(connection.name, {
      connection,
      running: new Map(),
      lastSeen: Date.now(),
      doubtful: false,
      warmKeys: new Set(),
    });
    this.knownPlatforms.set(connection.name, connection.properties);
    this.dispatch();
  }

  heartbeat(workerName: string): void {
    const worker = this.workers.get(workerName);
    if (!worker) return;
    worker.lastSeen = Date.now();
    if (worker.doubtful) {
      worker.doubtful = false;
      this.dispatch();
    }
  }

  /** The worker's report of the idle warm runners it holds (all of them, replacing its last report). */
  warmRunners(workerName: string, keys: readonly string[]): void {
    const worker = this.workers.get(workerName);
    if (!worker) return;
    worker.warmKeys = new Set(keys);
    this.dispatch();
  }

  /** The worker's stream ended or it went silent: its actions go back to the queue. */
  disconnect(workerName: string, reason: string): void {
    const worker = this.workers.get(workerName);
    if (!worker) return;
    this.workers.delete(workerName);
    const group = worker.connection.group;
    if (group !== undefined) {
      for (const other of this.workers.values()) if (other.connection.group === group) other.doubtful = true;
    }
    // Each action the worker was running has used the one attempt its start counted, whatever the cause.
    for (const task of worker.running.values()) {
      task.lease = undefined;
      task.suspect = true;
      if (task.operations.size === 0) continue;
      if (task.attempts >= this.options.maxAttempts) {
        const message =
          `the action was started ${task.attempts} times (execution.maxAttempts) and each time its worker ` +
          `vanished while running it (last: ${workerName}, ${reason}); it may be what makes workers crash`;
        this.finishTask(task, failure(Code.UNAVAILABLE, message));
        continue;
      }
      for (const op of task.operations) op.advance(ExecutionStage_Value.QUEUED);
      this.enqueue(task);
    }
    this.dispatch();
  }

  /**
   * A worker's report on a lease; stale or unknown leases are ignored. The
   * worker's slot is free at once, even when the outcome still has to be
   * made ready (its inline blobs stored), so the next action is not delayed.
   */
  async complete(workerName: string, leaseId: string, outcome: WorkerOutcome | Promise<WorkerOutcome>): Promise<void> {
    const worker = this.workers.get(workerName);
    const task = worker?.running.get(leaseId);
    if (!worker || !task) return;
    worker.running.delete(leaseId);
    task.lease = undefined;
    this.dispatch();
    if (task.operations.size === 0) return;
    let response: ExecuteResponse;
    try {
      response = await this.options.finish(task.job, await outcome);
    } catch (err) {
      response = failure(Code.INTERNAL, `storing the result failed: ${(err as Error).message}`);
    }
    this.finishTask(task, response);
  }

  private finishTask(task: Task, response: ExecuteResponse): void {
    if (this.inFlight.get(task.key) === task) this.inFlight.delete(task.key);
    for (const op of task.operations) op.complete(response);
    task.operations.clear();
  }

  private abandon(task: Task): void {
    if (this.inFlight.get(task.key) === task) this.inFlight.delete(task.key);
    const queued = this.queue.indexOf(task);
    if (queued >= 0) this.queue.splice(queued, 1);
    if (task.lease) {
      const { id, worker } = task.lease;
      worker.running.delete(id);
      task.lease = undefined;
      worker.connection.cancel(id);
      this.dispatch();
    }
  }

  private enqueue(task: Task): void {
    const before = (a: Task, b: Task) =>
      a.job.priority < b.job.priority || (a.job.priority === b.job.priority && a.seq < b.seq);
    let at = this.queue.length;
    while (at > 0 && before(task, this.queue[at - 1] as Task)) at--;
    this.queue.splice(at, 0, task);
  }

  private dispatch(): void {
    const now = Date.now();
    // Workers holding a warm runner choose first, so that they take the actions asking for it.
    const workers = [...this.workers.values()].sort((a, b) => b.warmKeys.size - a.warmKeys.size);
    for (const worker of workers) {
      if (worker.doubtful) continue;
      while (worker.running.size < worker.connection.slots) {
        const busy = this.groupBusy(worker);
        if (busy === "suspect") break;
        const index = this.queue.findIndex(
          (t) =>
            !unmetProperty(worker.connection.properties, t.job.platform) &&
            !(t.suspect && busy === "busy") &&
            !this.waitsForWarmRunner(t, worker, now),
        );
        if (index < 0) break;
        const [task] = this.queue.splice(index, 1) as [Task];
        this.start(task, worker);
      }
    }
  }

  /**
   * Whether `task` should rather wait for another worker that holds an idle
   * warm runner of its key (and is busy now): only for warmRunnerWaitMs from
   * its queueing, after which a dispatch is due and any worker takes it.
   */
  private waitsForWarmRunner(task: Task, worker: WorkerState, now: number): boolean {
    const key = task.job.runnerKey;
    const waitMs = this.options.warmRunnerWaitMs ?? 0;
    if (key === undefined || waitMs <= 0 || worker.warmKeys.has(key)) return false;
    const until = task.job.queuedAt.getTime() + waitMs;
    if (now >= until) return false;
    const holder = [...this.workers.values()].some((w) => w !== worker && !w.doubtful && w.warmKeys.has(key));
    if (holder) this.dispatchAt(until);
    return holder;
  }

  /** One dispatch at `at` (or earlier, when one is already due earlier). */
  private dispatchAt(at: number): void {
    if (this.warmWaitTimer && this.warmWaitTimer.at <= at) return;
    clearTimeout(this.warmWaitTimer?.timer);
    const timer = setTimeout(
      () => {
        this.warmWaitTimer = undefined;
        this.dispatch();
      },
      Math.max(0, at - Date.now()),
    );
    timer.unref();
    this.warmWaitTimer = { at, timer };
  }

  /**
   * What runs in the worker's group (its own slots, and those of the
   * connections sharing its group): a suspect runs alone there, so a crash
   * it causes costs no other action an attempt.
   */
  private groupBusy(worker: WorkerState): "idle" | "busy" | "suspect" {
    const group = worker.connection.group;
    const members =
      group === undefined ? [worker] : [...this.workers.values()].filter((w) => w.connection.group === group);
    let busy = false;
    for (const member of members) {
      for (const task of member.running.values()) {
        if (task.suspect) return "suspect";
        busy = true;
      }
    }
    return busy ? "busy" : "idle";
  }

  /** Cancels the operations no client has followed for `timeoutMs` (their actions stop when nobody else waits). */
  private dropUnwatched(timeoutMs: number): void {
    const now = Date.now();
    for (const [name, { operation }] of this.operations) {
      if (operation.done || operation.followers > 0 || now - operation.unwatchedSince < timeoutMs) continue;
      this.cancel(
        name,
        `no client followed the operation for ${timeoutMs / 1000} s (execution.unwatchedOperationTimeoutSeconds); it was dropped`,
      );
    }
  }

  private start(task: Task, worker: WorkerState): void {
    const leaseId = randomUUID();
    task.attempts++;
    task.lease = { id: leaseId, worker };
    worker.running.set(leaseId, task);
    for (const op of task.operations) op.advance(ExecutionStage_Value.EXECUTING);
    const { job } = task;
    worker.connection.assign({
      leaseId,
      instanceName: job.instanceName,
      digestFunction: job.actionDigest.fn.wireValue,
      actionDigest: { hash: job.actionDigest.hash, sizeBytes: job.actionDigest.sizeBytes },
      action: job.action,
      command: job.command,
      ...environmentToWire(job.environment),
      runnerKey: job.runnerKey ?? "",
      inputDirectories: (job.inputBlobs?.directories ?? []).map(wireBlob),
      inputFiles: (job.inputBlobs?.files ?? []).map(wireBlob),
      registryCredentials: job.registryCredentials && {
        username: job.registryCredentials.username,
        password: job.registryCredentials.password,
      },
      timeout: { seconds: Math.floor(job.timeoutMs / 1000), nanos: (job.timeoutMs % 1000) * 1e6 },
      queuedTimestamp: {
        seconds: Math.floor(job.queuedAt.getTime() / 1000),
        nanos: (job.queuedAt.getTime() % 1000) * 1e6,
      },
    });
  }

  private expireLeases(): void {
    const deadline = Date.now() - this.options.leaseTimeoutMs;
    for (const [name, worker] of this.workers) {
      if (worker.lastSeen < deadline) this.disconnect(name, `no heartbeat for ${this.options.leaseTimeoutMs} ms`);
    }
  }

  private track(operation: Operation, task: Task): void {
    const entry = this.operations.get(operation.name);
    if (entry) entry.task = task;
  }

  private remember(operation: Operation, task: Task | undefined): void {
    this.operations.set(operation.name, { operation, task });
    const forget = () => {
      const timer = setTimeout(() => this.operations.delete(operation.name), this.options.retainCompletedMs);
      timer.unref();
    };
    if (operation.done) forget();
    else
      operation.watch((op) => {
        if (op.done) forget();
      });
  }
}

/** A response for an execution that did not produce a result. */
export function failure(code: Code, message: string, details: Status["details"] = []): ExecuteResponse {
  return { result: undefined, cachedResult: false, status: { code, message, details }, serverLogs: {}, message };
}

function wireBlob(blob: StoredBlob): BatchUpdateBlobsRequest_Request {
  const { hash, sizeBytes } = blob.digest;
  return { digest: { hash, sizeBytes }, data: blob.data, compressor: Compressor_Value.IDENTITY };
}
