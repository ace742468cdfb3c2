import { randomUUID } from "node:crypto";
import type { Digest } from "../digest/digest.js";
import { type ExecuteResponse, ExecutionStage_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/**
 * One client's view of an execution: what Execute and WaitExecution stream.
 * Several operations may share one running action (deduplication).
 */
export class Operation {
  readonly name = `operations/${randomUUID()}`;
  private currentStage: ExecutionStage_Value = ExecutionStage_Value.CACHE_CHECK;
  private finalResponse: ExecuteResponse | undefined;
  private readonly listeners = new Set<(op: Operation) => void>();
  private clientFollowers = 0;
  private lastFollowed = Date.now();

  constructor(
    readonly instanceName: string,
    readonly actionDigest: Digest,
  ) {}

  get stage(): ExecutionStage_Value {
    return this.currentStage;
  }

  get response(): ExecuteResponse | undefined {
    return this.finalResponse;
  }

  get done(): boolean {
    return this.finalResponse !== undefined;
  }

  /** Clients streaming the operation now (Execute, WaitExecution). */
  get followers(): number {
    return this.clientFollowers;
  }

  /** When the last client stopped following it (its creation, if none ever did); meaningless while followed. */
  get unwatchedSince(): number {
    return this.lastFollowed;
  }

  /**
   * Records a client streaming the operation until the returned function is
   * called: an operation nobody follows for long is dropped by the scheduler.
   */
  follow(): () => void {
    this.clientFollowers++;
    let left = false;
    return () => {
      if (left) return;
      left = true;
      this.clientFollowers--;
      this.lastFollowed = Date.now();
    };
  }

  advance(stage: ExecutionStage_Value): void {
    if (this.done || stage === this.currentStage) return;
    this.currentStage = stage;
    this.notify();
  }

  complete(response: ExecuteResponse): void {
    if (this.done) return;
    this.currentStage = ExecutionStage_Value.COMPLETED;
    this.finalResponse = response;
    this.notify();
    this.listeners.clear();
  }

  /** Calls `listener` on every change until it completes; returns the unsubscribe function. */
  watch(listener: (op: Operation) => void): () => void {
    if (this.done) return () => {};
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener(this);
  }
}
