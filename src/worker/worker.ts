import { setTimeout as sleep } from "node:timers/promises";
import type { ClientDuplexStream } from "@grpc/grpc-js";
import type { Property } from "../action/property.js";
import type { ClientChannel } from "../auth/client-channel.js";
import type { ImagePullState } from "../gen/berth/image/v1/image.js";
import { type HubMessage, type ImagePull, WorkerHubClient, type WorkerMessage } from "../gen/berth/worker/v1/worker.js";
import type { Logger } from "../log/log.js";
import { OK_STATUS, toRpcStatus } from "../status/rpc-status.js";
import { Code, StatusError, toStatusError } from "../status/status.js";
import type { ActionDirectories } from "./action-directories.js";
import { type ActionExecutor, executionContext, failedCompletion } from "./action-executor.js";
import { failureStatus } from "./failure-status.js";
import type { PullProgress, WorkerImages } from "./worker-images.js";

/** Progress of an image pull is reported at most this often (plus the final report). */
const PULL_PROGRESS_INTERVAL_MS = 200;

export interface WorkerOptions {
  workerName: string;
  /** The farm's gRPC port (scheduler and CAS alike), with the worker's token (and TLS settings). */
  hub: ClientChannel;
  /** What the worker offers (its runners' capabilities among them). */
  properties: Property[];
  slots: number;
  /** Runs each assignment (see worker-executor.ts). */
  executor: ActionExecutor;
  /** Where each action gets a directory of its own, removed when it is done. */
  directories: ActionDirectories;
  /** The worker's images, which the hub may ask it to pull ahead; undefined when it runs none. */
  images: WorkerImages | undefined;
  /** The keys of the idle warm runners the worker's process holds, reported to the hub as they change. */
  warmKeys?: WarmKeys;
  log: Logger;
}

/** The keys of a worker process's idle warm runners, which each of its workers reports on its stream. */
export class WarmKeys {
  private keys: readonly string[] = [];
  private readonly listeners = new Set<(keys: readonly string[]) => void>();

  get current(): readonly string[] {
    return this.keys;
  }

  publish(keys: readonly string[]): void {
    this.keys = keys;
    for (const listener of this.listeners) listener(keys);
  }

  subscribe(listener: (keys: readonly string[]) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

/**
 * A worker: holds one Connect stream to the scheduler, runs what it is
 * assigned, reports each outcome, and reconnects when the stream breaks.
 */
export class Worker {
  private readonly client: WorkerHubClient;
  private stream: ClientDuplexStream<WorkerMessage, HubMessage> | undefined;
  private readonly running = new Map<string, AbortController>();
  private heartbeat: NodeJS.Timeout | undefined;
  private stopped = false;
  private unsubscribe: (() => void) | undefined;

  constructor(private readonly options: WorkerOptions) {
    this.client = new WorkerHubClient(options.hub.target, options.hub.credentials, options.hub.options);
  }

  /** Connects, and keeps reconnecting with backoff until stop(). */
  start(): void {
    // Before the completion that gave a runner back is sent, so the scheduler knows of it when it dispatches.
    this.unsubscribe = this.options.warmKeys?.subscribe((keys) => this.reportWarmKeys(keys));
    void this.loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.unsubscribe?.();
    for (const controller of this.running.values()) controller.abort();
    clearInterval(this.heartbeat);
    this.stream?.end();
    this.client.close();
  }

  private async loop(): Promise<void> {
    let backoffMs = 100;
    while (!this.stopped) {
      const started = Date.now();
      await this.session().catch((err: unknown) => {
        this.options.log.warn(
          { err },
          `worker ${this.options.workerName}: connection to ${this.options.hub.target} lost`,
        );
      });
      if (this.stopped) break;
      backoffMs = Date.now() - started > 10_000 ? 100 : Math.min(backoffMs * 2, 5_000);
      await sleep(backoffMs);
    }
  }

  /** One stream's lifetime; resolves when it ends. */
  private session(): Promise<void> {
    const { workerName, properties, slots } = this.options;
    return new Promise((resolve, reject) => {
      const stream = this.client.connect();
      this.stream = stream;
      stream.on("data", (message: HubMessage) => this.onMessage(stream, message));
      stream.on("error", (err) => {
        this.abandonAll();
        reject(err);
      });
      stream.on("end", () => {
        this.abandonAll();
        resolve();
      });
      stream.write({ hello: { workerName, properties, slots } });
    });
  }

  private onMessage(stream: ClientDuplexStream<WorkerMessage, HubMessage>, message: HubMessage): void {
    if (message.welcome) {
      const interval = message.welcome.heartbeatInterval;
      const ms = interval ? interval.seconds * 1000 + interval.nanos / 1e6 : 5000;
      clearInterval(this.heartbeat);
      this.heartbeat = setInterval(() => stream.write({ heartbeat: { leaseIds: [...this.running.keys()] } }), ms);
      this.heartbeat.unref();
      this.options.log.info(`worker ${this.options.workerName} connected to ${this.options.hub.target}`);
      const keys = this.options.warmKeys?.current ?? [];
      if (keys.length > 0) this.reportWarmKeys(keys);
    }
    if (message.cancellation) this.running.get(message.cancellation.leaseId)?.abort();
    if (message.imagePull) void this.pullImage(stream, message.imagePull);
    const assignment = message.assignment;
    if (assignment) {
      const controller = new AbortController();
      this.running.set(assignment.leaseId, controller);
      const { directories, executor } = this.options;
      directories
        .take()
        .then((directory) =>
          executor.execute(assignment, executionContext(directory, controller.signal)).then(
            ({ completion }) => completion,
            (err: unknown) => failedCompletion(assignment.leaseId, failureStatus(err, directory)),
          ),
        )
        .catch((err: unknown) => failedCompletion(assignment.leaseId, toStatusError(err)))
        .then((completion) => {
          this.running.delete(assignment.leaseId);
          if (!controller.signal.aborted && stream === this.stream) stream.write({ completion });
          // After the answer: the next action's directory is not this one's to wait for.
          directories.prepareNext();
        });
    }
  }

  /**
   * Pulls an image into the store for the hub, running nothing in it, and
   * reports how it goes on the stream the request came on. Released at once,
   * the image stays in the store (least recently used) for later actions.
   */
  private async pullImage(stream: ClientDuplexStream<WorkerMessage, HubMessage>, pull: ImagePull): Promise<void> {
    const { workerName, images, log } = this.options;
    const send = (state: ImagePullState) => {
      // The pull outlives a broken stream (its layers serve later actions); its reports do not.
      if (stream === this.stream && stream.writable) {
        stream.write({ imagePullProgress: { pullId: pull.pullId, state } });
      }
    };
    let latest: PullProgress = { bytesDone: 0, bytesTotal: 0, layersDone: 0, layersTotal: 0 };
    const reports = throttle(PULL_PROGRESS_INTERVAL_MS, (progress: PullProgress) =>
      send({ ...progress, finished: false, status: undefined, manifestDigest: "", reference: "" }),
    );
    try {
      if (!images) throw new StatusError(Code.FAILED_PRECONDITION, `worker ${workerName} runs no container images`);
      // No credentials of its own: the worker's configured ones apply, as for an action that names none.
      const prepared = await images.prepare(pull.reference, undefined, (progress) => {
        latest = progress;
        reports.push(progress);
      });
      await prepared.release();
      reports.stop();
      const reference = String(prepared.reference);
      log.info({ worker: workerName, image: reference }, `worker ${workerName} pulled ${reference}`);
      send({ ...latest, finished: true, status: OK_STATUS, manifestDigest: prepared.manifestDigest, reference });
    } catch (err) {
      reports.stop();
      const status = toRpcStatus(toStatusError(err));
      log.warn({ worker: workerName, image: pull.reference, code: status.code }, status.message);
      send({ ...latest, finished: true, status, manifestDigest: "", reference: "" });
    }
  }

  private reportWarmKeys(keys: readonly string[]): void {
    const stream = this.stream;
    if (stream?.writable) stream.write({ warmRunners: { keys: [...keys] } });
  }

  /** The stream is gone, so are the leases: the scheduler queues their actions again. */
  private abandonAll(): void {
    clearInterval(this.heartbeat);
    for (const controller of this.running.values()) controller.abort();
    this.running.clear();
  }
}

/** Hands on the first value at once, then at most one (the latest) per `intervalMs`. */
function throttle<T>(intervalMs: number, emit: (value: T) => void): { push(value: T): void; stop(): void } {
  let lastAt = Number.NEGATIVE_INFINITY;
  let latest: { value: T } | undefined;
  let timer: NodeJS.Timeout | undefined;
  const flush = () => {
    timer = undefined;
    lastAt = Date.now();
    const pending = latest;
    latest = undefined;
    if (pending) emit(pending.value);
  };
  return {
    push(value) {
      latest = { value };
      if (timer) return;
      const wait = lastAt + intervalMs - Date.now();
      if (wait <= 0) flush();
      else timer = setTimeout(flush, wait);
    },
    stop() {
      clearTimeout(timer);
      timer = undefined;
    },
  };
}
